"""What a person or a program reads back: JSON documents, mask overlays, metric tables and files."""
