"""Training methods: one file per method; loss arithmetic lives in vlmalign.losses."""
