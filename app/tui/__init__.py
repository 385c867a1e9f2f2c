"""The Textual chat app that `llamadesk` opens with no arguments."""
from .app import ChatApp, run_chat

__all__ = ["ChatApp", "run_chat"]
