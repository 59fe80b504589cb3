"""variations-gateway: an OpenAI-compatible /v1/images/variations gateway for a team."""

__version__ = "0.1.0"
