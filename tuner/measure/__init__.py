"""Server plus load to summaries, SLO verdicts, /metrics scraping, the rate search."""
