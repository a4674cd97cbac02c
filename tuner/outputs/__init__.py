"""Everything that reads a finished record: report, plots, Prometheus, Kubernetes."""
