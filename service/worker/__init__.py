"""The only place that runs pipelines: loading and building variants, batching, progress, OOM handling."""
