"""llamadesk's application room: CLI, TUI, model store, planner and engine."""
