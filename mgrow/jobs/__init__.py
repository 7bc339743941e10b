"""One module per command: each validates its arguments (without torch), then runs on its ranks (``launch``)."""
