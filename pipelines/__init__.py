"""kaitune: Kaito-style fine-tuning as an Argo Workflow written with Hera."""

__version__ = "0.1.0"
