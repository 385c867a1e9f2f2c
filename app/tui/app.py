"""The chat app: key bindings, command palette, help screen, and the screen stack.

One table, `COMMANDS`, makes the key bindings, the palette entries and the help screen, so the
three cannot disagree. Each action asks a modal for what it needs and hands the answer to the
chat screen, which does the work.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from ..errors import UserError
from ..history import ChatSettings, History
from .backend import Loader, engine_loader, memory_in_use, remote_loader
from .screens.chat import ChatScreen
from .screens.connections import LOCAL, ConnectionPicker
from .screens.dialogs import AskText, ConfirmDialog
from .screens.docs import DocsPicker
from .screens.help import HelpScreen
from .screens.models import ModelPicker
from .screens.pull import PullModal
from .screens.settings import SettingsModal

# (keys, action, title, what it does, shown in the footer)
COMMANDS: list[tuple[str, str, str, str, bool]] = [
    ("ctrl+n", "new_chat", "New chat", "Start a new conversation", True),
    ("escape", "stop", "Stop", "Stop the reply; what it wrote so far stays", True),
    ("ctrl+r", "regenerate", "Regenerate", "Write the last reply again", True),
    ("f4", "copy", "Copy reply", "Copy the focused message or the last reply", False),
    ("ctrl+s", "settings", "Settings", "System prompt and sampling for this chat", True),
    ("ctrl+o", "switch_model", "Model", "Chat with another installed model or variant", True),
    ("f2", "rename", "Rename chat", "Give this chat another title", False),
    ("f3", "export", "Export chat", "Save this chat as a Markdown file", False),
    ("f8", "delete", "Delete chat", "Delete this chat (asks first)", False),
    ("f9", "documents", "Documents", "Answer from document collections or an attached file", False),
    ("ctrl+t", "connections", "Servers", "Chat with models on a server: pick, add or remove a saved one", False),
    ("ctrl+b", "toggle_sidebar", "Sidebar", "Show or hide the list of chats", False),
    ("f5", "download", "Download model", "Download and install the default model", False),
    ("f1", "help", "Help", "Every key and command", True),
]

# keys handled by widgets or by Textual itself, listed in the help screen only
OTHER_KEYS: list[tuple[str, str, str]] = [
    ("Enter", "Send", "Send the prompt"),
    ("Shift+Enter, Ctrl+J", "New line", "A new line in the prompt"),
    ("Tab, Shift+Tab", "Focus", "Move between chats, messages and the prompt"),
    ("Ctrl+P", "Commands", "Search every command"),
    ("Ctrl+Q", "Quit", "Leave llamadesk (a reply in progress stops)"),
]


def _key_label(keys: str) -> str:
    """'ctrl+n,f5' -> 'Ctrl+N, F5', as the help screen shows keys."""
    names = {"escape": "Esc"}
    return ", ".join("+".join(names.get(p, p.capitalize() if len(p) > 1 else p.upper()) for p in k.split("+"))
                     for k in keys.split(","))


class ChatApp(App):
    TITLE = "llamadesk"
    # the stylesheet ships in the `assets` package, so it is found wherever llamadesk is installed
    CSS_PATH = str(resources.files("assets").joinpath("app.tcss"))
    BINDINGS = [Binding(keys, action, title, show=shown) for keys, action, title, _, shown in COMMANDS]

    def __init__(self, model: str | None = None, settings: ChatSettings | None = None, *,
                 history: History | None = None, loader: Loader | None = None, ctx: int | None = None,
                 device: str | None = None, memory: Callable[[], int] | None = memory_in_use,
                 pull: Callable[[str], object] | None = None, kv_dtype: str = "auto",
                 chat_format: str | None = None, remote=None) -> None:
        """`model` is a ref to load at start (default: the installed default model; with `remote`,
        an app.remote.Remote, the server's name for one, default its first). `loader`, `memory` and
        `pull` replace the real engine, the RSS probe and the download in tests."""
        super().__init__()
        # opened here, before the terminal switches to the app, so a history written by a newer
        # llamadesk fails as one line from the CLI
        self.history = history or History()
        self.chat = ChatScreen(self.history, loader or engine_loader(ctx, device, kv_dtype, chat_format), model,
                               settings or ChatSettings(), memory)
        if remote is not None:
            self.chat.remote, self.chat.loader = remote, remote_loader(remote)
        self.pull = pull or _pull_default

    def get_default_screen(self) -> Screen:
        return self.chat

    def on_unmount(self) -> None:
        self.history.close()

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Every notification is plain text: they quote titles, paths and errors, which may hold
        `[...]` (widgets' own notify passes markup=True by default, so it is overruled here)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    # ------------------------------------------------------------ palette, help
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is self.chat:
            for _, action, title, why, _ in COMMANDS:
                yield SystemCommand(title, why, partial(self.run_action, action))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # chat commands act on the chat screen; behind a modal they would act on something unseen
        if action in _ACTIONS and self.screen is not self.chat:
            return False
        return True

    def action_help(self) -> None:
        rows = [(_key_label(keys), title, why) for keys, _, title, why, _ in COMMANDS] + OTHER_KEYS
        self.push_screen(HelpScreen(rows))

    # ------------------------------------------------------------ chats
    async def action_new_chat(self) -> None:
        await self.chat.new_chat()

    def action_stop(self) -> None:
        self.chat.stop()

    async def action_regenerate(self) -> None:
        await self.chat.regenerate()

    def action_copy(self) -> None:
        text = self.chat.copy_text()
        if text is None:
            self.notify("There is no reply to copy yet.", severity="warning")
            return
        # OSC 52: the terminal puts it on the clipboard, over SSH too
        self.copy_to_clipboard(text)
        self.notify(f"Copied {len(text)} characters.")

    def action_rename(self) -> None:
        if self.chat.conversation is None:
            self.notify("This chat is saved at its first prompt; rename it then.", severity="warning")
            return
        self.push_screen(AskText("Rename this chat", self.chat.chat_title, "Rename",
                                 "A chat needs a name (Esc keeps this one's)."),
                         lambda title: title and self.chat.rename(title))

    def action_delete(self) -> None:
        conversation = self.chat.conversation
        if conversation is None:
            return

        async def answered(yes: bool) -> None:
            if yes:
                await self.chat.delete_current()

        self.push_screen(ConfirmDialog(f"Delete “{conversation.title}” and all its messages? "
                                       f"This cannot be undone.", "Delete"), answered)

    def action_export(self) -> None:
        if self.chat.conversation is None:
            self.notify("This chat is empty; there is nothing to export.", severity="warning")
            return

        def answered(path: str | None) -> None:
            if not path:
                return
            try:
                written = self.chat.export(Path(path).expanduser())
            except (UserError, OSError) as e:
                self.notify(f"Could not export: {e}", severity="error")
                return
            self.notify(f"Exported to {written}")

        self.push_screen(AskText("Export this chat to a Markdown file", str(self.chat.default_export_path()),
                                 "Export", "Type the file to write (Esc cancels)."), answered)

    def action_settings(self) -> None:
        self.push_screen(SettingsModal(self.chat.settings, self.chat.chat_title),
                         lambda settings: settings and self.chat.apply_settings(settings))

    def action_switch_model(self) -> None:
        if self.chat.remote is None:
            self.push_screen(ModelPicker.installed(self.chat.model_ref), lambda ref: ref and self.chat.load_model(ref))
        else:
            self._pick_remote_model(self.chat.remote)

    @work(thread=True, exclusive=True, group="remote-models", exit_on_error=False)
    def _pick_remote_model(self, remote) -> None:
        """The server's list, asked for off the UI thread (a server can be slow or gone)."""
        try:
            names = remote.models()
        except UserError as e:
            self.call_from_thread(self.notify, str(e), severity="error")
            return
        picker = ModelPicker([(name, "") for name in names], self.chat.model_ref, f"{remote.where()} lists no models.")
        self.call_from_thread(self.push_screen, picker, lambda ref: ref and self.chat.load_model(ref))

    def action_connections(self) -> None:
        current = self.chat.remote.base if self.chat.remote is not None else None

        def answered(name: str | None) -> None:
            if name is None:
                return
            if name == LOCAL:
                self.chat.use_local()
                return
            from ..connections import open_connection

            try:
                remote = open_connection(self.history, name)
            except UserError as e:
                self.notify(str(e), severity="error")
                return
            self.chat.use_remote(remote)

        self.push_screen(ConnectionPicker(self.history, current), answered)

    def action_documents(self) -> None:
        from ..docs import DocsIndex

        try:
            with DocsIndex() as index:
                collections = index.collections()
        except UserError as e:
            self.notify(str(e), severity="error")
            return
        settings = self.chat.settings
        self.push_screen(DocsPicker(collections, list(settings.docs), settings.file),
                         lambda picked: picked and self.chat.apply_settings(
                             replace(settings, docs=tuple(picked[0]), file=picked[1])))

    def action_toggle_sidebar(self) -> None:
        sidebar = self.chat.query_one("#sidebar")
        sidebar.display = not sidebar.display

    # ------------------------------------------------------------ first start
    @on(ChatScreen.NeedsModel)
    def _offer_download(self) -> None:
        self.action_download()

    def action_download(self) -> None:
        """The first start's offer, at any time: after "Not now", or to install the default model again."""
        from ..pull import load_catalog

        default, _ = load_catalog()

        def answered(ref: str | None) -> None:
            if ref:
                self.chat.load_model(ref)
            else:
                self.chat.query_one("#status").activity = "no model installed: `llamadesk pull` fetches one"

        self.push_screen(PullModal(default, self.pull), answered)


_ACTIONS = {action for _, action, _, _, _ in COMMANDS}


def _pull_default(name: str):
    import sys

    from ..pull import pull_model

    # the pull modal shows what comes on stderr: each step on its line, progress redrawn in place
    return pull_model(name, say=lambda line: print(f"\r{line}", file=sys.stderr),
                      progress=lambda done, total, what: print(f"\r{what[:48]} {done}/{total}", end="",
                                                               file=sys.stderr))


def run_chat(model: str | None = None, system: str | None = None, params=None, ctx: int | None = None,
             device: str | None = None, kv_dtype: str = "auto", chat_format: str | None = None,
             remote: str | None = None, remote_key_file: Path | None = None) -> int:
    """The full-screen chat; `params` (model.generate.SamplingParams, or with `remote` a dict of
    OpenAI fields) seeds new chats' settings; `chat_format` (--chat-format) overrides the model's
    for this run; `remote` (a URL) chats with that server's models, its key from
    `remote_key_file` or $LLAMADESK_REMOTE_KEY."""
    server = None
    if remote:
        from ..remote import Remote, read_key

        server = Remote.connect(remote, read_key(remote_key_file))
    settings = ChatSettings(system=system or "")
    if isinstance(params, dict):  # a server's: the OpenAI fields given (temperature, top_p, seed)
        settings = ChatSettings(system=system or "", **params)
    elif params is not None:
        settings = ChatSettings.from_sampling(params, system or "")
    app = ChatApp(model, settings, ctx=ctx, device=device, kv_dtype=kv_dtype, chat_format=chat_format, remote=server)
    app.run()
    return app.return_code or 0
