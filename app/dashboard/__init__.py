"""The usage dashboard served under ``/dashboard`` (operator and team views)."""

from app.dashboard.routes import install_dashboard

__all__ = ["install_dashboard"]
