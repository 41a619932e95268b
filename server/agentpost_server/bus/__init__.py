"""Internal server-to-server frames (generated code in v1/)."""
