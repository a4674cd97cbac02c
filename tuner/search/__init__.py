"""The study, the trials, the record and the profile."""
