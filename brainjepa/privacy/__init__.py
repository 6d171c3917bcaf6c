"""Site-side differential privacy: DP-SGD steps (`dpsgd`), Poisson sampling of subjects (`sampling`), the
site's privacy ledger and accountant (`budget`) and its report (`report`). See docs/privacy.md."""
