"""The site data edge: site configs, ROI series in, model-ready windows out, generated cohorts."""
