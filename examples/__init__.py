"""Services built on holdfast's public API, each the subject of a tutorial in docs/."""
