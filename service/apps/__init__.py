"""The built-in apps: inventory and fulfillment, built on the public API only."""
