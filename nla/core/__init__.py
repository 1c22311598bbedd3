"""What every other package uses: config, metrics, rewards, templates, sidecars, atomic writes, logging."""
