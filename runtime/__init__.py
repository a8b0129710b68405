"""The lean APD runtime: loads a bundle and decodes between engine calls. Never imports torch."""
