"""guardstream's service layer: the Faust app, agents, publishing, config, telemetry, CLI."""
