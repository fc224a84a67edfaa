"""vigu: Uni-ViGU on Wan2.1 through diffusers."""

__version__ = "0.1.0.dev0"
