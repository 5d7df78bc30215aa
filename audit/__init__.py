"""Reproducibility audit of a submission: bundle (audit.bundle), verify (audit.verify), Track 1 compliance (audit.compliance)."""
