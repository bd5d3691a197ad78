"""The holdfast service: engine, stores, snapshot, gateway, servicers, CLI."""
