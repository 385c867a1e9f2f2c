"""The chat screen: conversations on the left, the open one on the right, the prompt below it.

The screen owns the history, the loaded model and the reply in flight. Loading and generating run
in thread workers, both on one thread (backend.ModelThread). The reply puts text pieces on a
queue that a timer drains about 30 times a second; the reply's Markdown shows the first piece at
once and then takes the pieces in updates spaced for the screen to spend about UI_SHARE of a core
on them (a dozen a second at most), not one per token. Esc sets the reply's cancel event; the
reply checks it between its steps, the engine before every token and between the layers of a
prompt (a stop lands within ~0.1 s), and a remote model (app.remote.RemoteChat) before every
chunk, closing the stream.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer
from textual.worker import get_current_worker

from ... import store
from ...errors import UserError
from ...history import DEFAULT_TITLE, ChatSettings, Conversation, History, title_for, to_markdown, write_atomic
from ...history import Message as SavedMessage
from ..backend import (ChatModel, Loader, ModelThread, PromptFitted, PromptTooLong, ReplyEnded, fit_to_context,
                       remote_loader, reply_room)
from ..widgets.conversation_list import ConversationList
from ..widgets.prompt import PromptInput
from ..widgets.status import StatusLine
from ..widgets.transcript import MessageView, Notice, Transcript
from .dialogs import ConfirmDialog

DRAIN_INTERVAL_S = 1 / 30
# Each update re-parses the reply's last Markdown block, lays out and draws a frame on this thread,
# holding the GIL that the model's thread takes back after every op between its compiled steps:
# at 30 updates a second the screen took a quarter of a core and replies decoded at 0.6-0.7x of
# `ask`'s speed (docs/BENCHMARKS.md). A dozen a second at most.
WRITE_INTERVAL_S = 1 / 12
# On two cores each point of a core the screen takes is taken from a decode thread, and an update
# costs more than its Markdown: the layout and the frames after it (~16 ms of this thread's CPU
# here at 120x40: 15-17% of a core at 12 a second, replies at 0.79-0.84x of the engine alone; with
# no updates, 6% and 0.90-0.93x). So updates are spaced for the screen to spend UI_SHARE of a core
# on them, as measured update by update (here ~3 a second, 0.83-0.88x), and the status line's
# figures change with the text, in its frames.
UI_SHARE = 0.05
MAX_WRITE_INTERVAL_S = 0.5  # a slow terminal still shows the reply grow twice a second
NUMBERS_INTERVAL_S = 0.25  # the status line's context and tok/s during a reply
SIDEBAR_MIN_WIDTH = 80  # terminal columns below which the sidebar and the footer start hidden


def _variant_label(entry) -> str:
    """The variant and, for an installed one, its bits a weight ("source 6.0 bits"); a remote
    model's name alone (the server does not say)."""
    if not isinstance(entry, store.ModelEntry):
        return entry.variant
    from ...model_info import bits_per_weight

    return f"{entry.variant} {bits_per_weight(entry):.1f} bits"


@dataclass
class _Sources:
    """The passages a reply was given, as {"n", "path", "line", "page"} dicts (a message's meta)."""

    passages: list[dict]


@dataclass
class _Said:
    """A line for the transcript from the reply's thread, e.g. a `#NAME` that names no collection."""

    text: str


@dataclass
class _Reply:
    """The reply being written: where its pieces arrive and where they go."""

    conversation_id: int
    view: MessageView
    cancel: threading.Event = field(default_factory=threading.Event)
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    timer: Timer | None = None
    unshown: str = ""  # text taken from `pieces`, not yet on screen
    show_after: float = 0.0  # time.monotonic() before which no more text is shown
    written_at: tuple[float, float] | None = None  # (monotonic, thread_time) as the last update began
    prompt_tokens: int = 0
    numbers_after: float = 0.0  # time.monotonic() of the next status line update during the reply
    sources: list[dict] | None = None  # None: the chat uses no documents


class ChatScreen(Screen):
    class NeedsModel(Message):
        """Nothing is installed: the app offers to download the default model."""

    def __init__(self, history: History, loader: Loader, model_ref: str | None, settings: ChatSettings,
                 memory: Callable[[], int] | None) -> None:
        super().__init__()
        self.history = history
        self.loader = loader
        self.model_thread = ModelThread()  # loads the model and writes the replies (see ModelThread)
        self.local_loader = loader
        self.remote = None  # app.remote.Remote: the models come from this server (None: this machine)
        self.local_ref: str | None = None  # the local model in use before a server's, to go back to
        self.model_ref = model_ref
        self.model: ChatModel | None = None
        self.loading_since: float | None = None
        self.loading_timer: Timer | None = None
        self.new_chat_settings = settings
        self.conversation: Conversation | None = None  # None: a new chat, saved at its first prompt
        self.draft_settings = settings
        self.reply: _Reply | None = None
        self.waiting_for_model = False  # a prompt was sent while the model loads
        self.load_error: str | None = None  # why the last load failed, for a prompt sent after it
        self.memory = memory

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield ConversationList(id="sidebar")
            with Vertical(id="main"):
                yield Transcript(id="transcript")
                yield PromptInput(id="prompt")
        yield StatusLine(id="status")
        yield Footer()

    def on_resize(self, event) -> None:
        # below 80 columns the transcript needs the room: the sidebar folds away (Ctrl+B shows it),
        # and so does the footer, whose keys would be cut (even compact they need 76 columns);
        # the welcome line names F1 and Ctrl+P, which list every key
        wide = event.size.width >= SIDEBAR_MIN_WIDTH
        self.query_one("#sidebar").display = wide
        self.query_one(Footer).display = wide

    async def on_mount(self) -> None:
        self.query_one("#sidebar").border_title = "Chats"
        self._refresh_sidebar()
        self._show_docs()
        await self.query_one(Transcript).show([])
        self.query_one(PromptInput).focus()
        if self.history.recovered_from is not None:
            text = (f"The chat history could not be read, so a fresh one was started. "
                    f"The old file is kept as {self.history.recovered_from}.")
            await self._notice(text, "error")
            self.notify(text, severity="error", timeout=15)
        if self.memory is not None:
            self._show_memory()
            self.set_interval(2, self._show_memory)
        # a restart picks up where the last session left off: its chat and its model
        last_chat = self.history.state("last_chat")
        if isinstance(last_chat, int) and self.history.exists(last_chat):
            await self.open_conversation(last_chat)
        if self.remote is not None:
            self.load_model(self.model_ref or self._last_remote_model())
            return
        ref = self.model_ref or self._last_model() or self._installed_model()
        if ref is None:
            self.post_message(self.NeedsModel())
        else:
            self.load_model(ref)

    def on_unmount(self) -> None:
        # The app cannot exit while a worker thread runs: a reply stops at its next token, and
        # what it wrote so far is saved like any stopped reply.
        reply, self.reply = self.reply, None
        if reply is None:
            return
        reply.cancel.set()
        text = reply.view.content + reply.unshown
        while True:
            try:
                item = reply.pieces.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):
                text += item
        if text:
            self.history.add_message(reply.conversation_id, "assistant", text, stopped=True, model=reply.view.who)

    # ------------------------------------------------------------ the model
    def _last_model(self) -> str | None:
        """The model the last session loaded, if it is still installed."""
        ref = self.history.state("last_model")
        if not isinstance(ref, str):
            return None
        try:
            return store.find(ref).ref
        except UserError:
            return None

    def _last_remote_model(self) -> str:
        """The model last used on this server ("": the server's first)."""
        chosen = self.history.state("remote_models", {})
        return chosen.get(self.remote.base, "") if isinstance(chosen, dict) else ""

    def use_remote(self, remote, model: str | None = None) -> None:
        """Chat with models on `remote` (app.remote.Remote) from now on; `model` or the last used there."""
        if self._busy():
            return
        if self.remote is None:
            self.local_ref = self.model_ref
        else:
            self.remote.close()
        self.remote, self.loader = remote, remote_loader(remote)
        self.load_model(model or self._last_remote_model())

    def use_local(self) -> None:
        """Chat with this machine's models again."""
        if self._busy() or self.remote is None:
            return
        self.remote.close()
        self.remote, self.loader = None, self.local_loader
        ref = self.local_ref or self._last_model() or self._installed_model()
        if ref is None:
            self.post_message(self.NeedsModel())
        else:
            self.load_model(ref)

    @staticmethod
    def _installed_model() -> str | None:
        """The default model when installed, else the first installed one, else None."""
        from ...pull import load_catalog

        entries = store.list_entries()
        default, _ = load_catalog()
        for e in entries:
            if e.name == default:
                return e.name
        return entries[0].ref if entries else None

    def load_model(self, ref: str) -> None:
        if self.reply is not None:
            self.notify("Stop the reply first (Esc), then switch models.", severity="warning")
            return
        # the old model goes first, so two never sit in memory together
        self.model = None
        self.load_error = None
        status = self.query_one(StatusLine)
        status.model = ref or (f"a model on {self.remote.where()}" if self.remote is not None else "")
        status.variant, status.device, status.tokens_per_s = "", "", None
        status.ctx_used = status.ctx_total = 0
        status.ctx_estimated = False
        self.loading_since = time.monotonic()
        self._show_loading()
        if self.loading_timer is None:
            self.loading_timer = self.set_interval(0.5, self._show_loading)
        self._load(ref)

    def _show_loading(self) -> None:
        self.query_one(StatusLine).activity = f"loading… {time.monotonic() - self.loading_since:.0f}s"

    def _done_loading(self) -> None:
        self.loading_since = None
        if self.loading_timer is not None:
            self.loading_timer.stop()
            self.loading_timer = None

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load(self, ref: str) -> None:
        try:
            model = self.model_thread.call(self.loader, ref)
        except Exception as e:  # a missing or broken model is shown, not fatal
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            outcome = partial(self._load_failed, ref, message)
        else:
            outcome = partial(self._loaded, model)
        # a thread cannot be cancelled: a load overtaken by a newer one finishes, then keeps quiet
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(outcome)

    async def _loaded(self, model: ChatModel) -> None:
        self._done_loading()
        self.model = model
        self.model_ref = model.entry.ref
        status = self.query_one(StatusLine)
        status.model, status.variant = model.entry.name, _variant_label(model.entry)
        status.device, status.ctx_total, status.activity = model.device, model.ctx, ""
        if self.remote is None:
            self.history.set_state("last_model", model.entry.ref)
        else:
            chosen = self.history.state("remote_models", {})
            self.history.set_state("remote_models", {**(chosen if isinstance(chosen, dict) else {}),
                                                     self.remote.base: model.entry.ref})
            status.ctx_estimated = not model.ctx_reported
            if not model.ctx_reported:
                await self._notice(f"{self.remote.where()} does not say how long its context is: the app assumes "
                                   f"{model.ctx} tokens and trims the conversation by its own estimate of the "
                                   f"tokens, about 3 characters each.")
        self._measure_context()
        where = getattr(model, "chat_format_source", "")  # a format the model's files did not name
        if "guessed" in where or where.startswith("none"):
            await self._notice(f"Chat format: {where} (`llamadesk set {model.entry.name} chat-format NAME` "
                               "picks one)")
        if self.waiting_for_model:
            self.waiting_for_model = False
            await self._start_reply()

    async def _load_failed(self, ref: str, message: str) -> None:
        self._done_loading()
        self.waiting_for_model = False
        self.load_error = message
        self.query_one(StatusLine).activity = "no model loaded (Ctrl+O picks one)"
        await self._notice(f"Could not load {ref or 'a model'}: {message}", "error")

    def _show_memory(self) -> None:
        self.query_one(StatusLine).memory_bytes = self.memory()

    def _measure_context(self) -> None:
        if self.model is not None and self.reply is None:
            self._count_tokens(self.model, self._messages_for_model())

    @work(thread=True, exclusive=True, group="measure", exit_on_error=False)
    def _count_tokens(self, model: ChatModel, messages: list[dict]) -> None:
        n = model.count_tokens(messages) if messages else 0
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_ctx_used, n)

    def _show_ctx_used(self, n: int) -> None:
        if self.reply is None:  # a count that lands after the next reply began is that reply's to show
            self.query_one(StatusLine).ctx_used = n

    # ------------------------------------------------------------ conversations
    @property
    def settings(self) -> ChatSettings:
        return self.conversation.settings if self.conversation else self.draft_settings

    @property
    def chat_title(self) -> str:
        return self.conversation.title if self.conversation else DEFAULT_TITLE

    def _refresh_sidebar(self) -> None:
        current = self.conversation.id if self.conversation else None
        self.query_one(ConversationList).show(self.history.conversations(), current)

    def _busy(self) -> bool:
        if self.reply is not None:
            self.notify("A reply is being written; Esc stops it.", severity="warning")
            return True
        return False

    async def new_chat(self) -> None:
        if self._busy():
            return
        self.conversation = None
        self.draft_settings = self.new_chat_settings
        self.history.set_state("last_chat", None)
        await self.query_one(Transcript).show([])
        self.query_one(StatusLine).tokens_per_s = None  # no reply in this chat yet
        self._clear_reply_outcome()
        self._refresh_sidebar()
        self._measure_context()
        self._show_docs()
        self.query_one(PromptInput).focus()

    @on(ConversationList.Opened)
    async def _opened(self, event: ConversationList.Opened) -> None:
        await self.open_conversation(event.conversation_id)

    async def open_conversation(self, conversation_id: int) -> None:
        if self._busy():
            return
        try:
            self.conversation = self.history.get(conversation_id)
        except KeyError:  # deleted in another window
            self._refresh_sidebar()
            return
        self.history.set_state("last_chat", conversation_id)
        messages, skipped = self.history.read_messages(conversation_id)
        views: list = []
        for m in messages:
            views.append(self._view_of(m))
            sources = m.meta.get("sources")
            if m.role == "assistant" and isinstance(sources, list):  # cited again, as when it was written
                views[-1].meta = {"sources": sources}
                views.append(Notice(_sources_line(sources), "sources"))
        if skipped:
            views.append(Notice(f"{len(skipped)} stored message(s) of this chat could not be read and are "
                                f"left out (history rows {', '.join(map(str, skipped))}).", "error"))
        await self.query_one(Transcript).show(views)
        # this chat's last reply's speed, as saved with it; none for a chat without one
        timings = next((m.meta.get("timings") for m in reversed(messages) if m.role == "assistant"), None)
        speed = timings.get("tokens_per_s") if isinstance(timings, dict) else None
        number = isinstance(speed, (int, float)) and not isinstance(speed, bool)
        self.query_one(StatusLine).tokens_per_s = float(speed) if number and speed > 0 else None
        self._clear_reply_outcome()
        self._refresh_sidebar()
        self._measure_context()
        self._show_docs()
        self.query_one(PromptInput).focus()

    def _clear_reply_outcome(self) -> None:
        """The last reply's "stopped" belongs to its chat, not to the one opened now. With no model
        the activity says why (loading, a failed load) and stays."""
        if self.model is not None:
            self.query_one(StatusLine).activity = ""

    def _view_of(self, m: SavedMessage) -> MessageView:
        who = "You" if m.role == "user" else (m.model or "Assistant")
        return MessageView(m.role, m.content, who, message_id=m.id, stopped=m.stopped)

    def rename(self, title: str) -> None:
        if self.conversation is None:
            self.notify("Send a first prompt; a new chat is saved then.", severity="warning")
            return
        self.history.rename(self.conversation.id, title)
        self.conversation = self.history.get(self.conversation.id)
        self._refresh_sidebar()

    async def delete_current(self) -> None:
        if self.conversation is None or self._busy():
            return
        self.history.delete(self.conversation.id)
        self.notify(f"Deleted the chat “{self.conversation.title}”")  # no stop: a title may end in one
        await self.new_chat()

    def apply_settings(self, settings: ChatSettings) -> None:
        if self.conversation is None:
            self.draft_settings = settings
        else:
            self.history.set_settings(self.conversation.id, settings)
            self.conversation = replace(self.conversation, settings=settings)
        self._measure_context()
        self._show_docs()

    def _show_docs(self) -> None:
        s = self.settings
        self.query_one(StatusLine).docs = ", ".join([*s.docs] + ([Path(s.file).name] if s.file else []))

    def export(self, path: Path) -> Path:
        """Write the open conversation as Markdown; a folder gets a file named after the title."""
        if self.conversation is None:
            raise UserError("this chat is empty; there is nothing to export")
        if path.is_dir():
            path = path / _file_name(self.conversation.title)
        if not path.parent.is_dir():
            raise UserError(f"{path.parent}: no such folder")
        write_atomic(path, to_markdown(self.conversation, self.history.messages(self.conversation.id)))
        return path

    def default_export_path(self) -> Path:
        """In the user's documents folder (else home), never the folder llamadesk was started in,
        which is often a source checkout."""
        import platformdirs

        documents = platformdirs.user_documents_path()
        return (documents if documents.is_dir() else Path.home()) / _file_name(self.chat_title)

    def copy_text(self) -> str | None:
        """The focused message, else the last reply: the text to put on the clipboard."""
        focused = self.focused
        view = focused if isinstance(focused, MessageView) else self.query_one(Transcript).last_reply()
        if view is None:
            return None
        # a reply being written may hold text back from the screen (see _drain)
        return view.content + (self.reply.unshown if self.reply is not None and self.reply.view is view else "")

    # ------------------------------------------------------------ prompts and replies
    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        if self._busy():
            return
        text = event.text.rstrip()  # trailing whitespace only: the rest is the prompt as typed
        if self.model is None and self.loading_since is None:
            # nothing would answer: keep the prompt in the box rather than saving a chat without a reply
            await self._notice(self._not_sent_without_model(), "error")
            return
        if self.conversation is not None and not self.history.exists(self.conversation.id):
            # deleted in another window: this prompt starts a new chat with the same settings
            self.draft_settings, self.conversation = self.conversation.settings, None
            await self.query_one(Transcript).show([])
            await self._notice("This chat was deleted in another window; this prompt starts a new one.")
        if self.conversation is None:
            self.conversation = self.history.create(title_for(text), self.draft_settings)
            self.history.set_state("last_chat", self.conversation.id)
        message = self.history.add_message(self.conversation.id, "user", text)
        event.prompt.clear()
        await self.query_one(Transcript).add(self._view_of(message))
        self._refresh_sidebar()
        await self._start_reply()

    def _not_sent_without_model(self) -> str:
        if self.remote is None:
            return ("No model is loaded, so the prompt was not sent: Ctrl+O picks an installed one, F5 downloads "
                    "the default model.")
        # installing or downloading would not help: the server is what failed
        why = self.load_error or f"{self.remote.where()} gave no model"
        return f"The prompt was not sent: {why}. Ctrl+O asks the server again, Ctrl+T picks another one."

    async def regenerate(self) -> None:
        if self.conversation is None or self._busy():
            return
        messages = self.history.messages(self.conversation.id)
        if not messages:
            return
        if messages[-1].role == "assistant":
            self.history.delete_message(messages[-1].id)
            last = self.query_one(Transcript).last_reply()
            if last is not None:
                await last.remove()
        await self._start_reply()

    def stop(self) -> None:
        if self.reply is not None:
            self.reply.cancel.set()
            self.query_one(StatusLine).activity = "stopping…"
        elif self.waiting_for_model:
            self.waiting_for_model = False
            self.notify("The prompt stays unanswered; Ctrl+R sends it once the model is loaded.")

    def _messages_for_model(self) -> list[dict]:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        if self.conversation is None:
            return system
        return system + [{"role": m.role, "content": m.content} for m in self.history.messages(self.conversation.id)]

    async def _start_reply(self) -> None:
        if self.model is None:
            if self.loading_since is not None:
                self.waiting_for_model = True
                self.query_one(StatusLine).activity = "loading… the reply starts when the model is ready"
            else:
                await self._notice("No model is loaded; Ctrl+O picks one.", "error")
            return
        if self.remote is not None and self._quotes_documents():
            from ...connections import docs_consented

            if not docs_consented(self.history, self.remote):
                self.app.push_screen(ConfirmDialog(
                    f"This chat answers from your documents. Passages found in them will be sent to "
                    f"{self.remote.where()} with your prompt, now and in later chats with this server.",
                    "Send passages"), self._consented)
                return
        view = MessageView("assistant", "", self.model.entry.ref)
        await self.query_one(Transcript).add(view)
        self.reply = _Reply(self.conversation.id, view)
        self.reply.timer = self.set_interval(DRAIN_INTERVAL_S, self._drain)
        self.query_one(StatusLine).activity = "replying… (Esc stops)"
        self._write_reply(self.model, self._messages_for_model(), self.settings, self.reply.cancel, self.reply.pieces)

    def _quotes_documents(self) -> bool:
        """Whether the next reply quotes passages: the chat's collections or file, or a `#NAME`."""
        from ...docs.attach import tagged_collections

        if self.settings.docs or self.settings.file:
            return True
        messages = self.history.messages(self.conversation.id) if self.conversation else []
        return bool(messages) and messages[-1].role == "user" and bool(tagged_collections(messages[-1].content))

    async def _consented(self, yes: bool) -> None:
        if yes:
            from ...connections import consent_to_docs

            consent_to_docs(self.history, self.remote)
            await self._start_reply()
            return
        await self._take_back_prompt()
        await self._notice(f"Not sent: your documents stay on this machine. F9 turns them off for this chat, or "
                           f"send again and allow {self.remote.where()} to receive passages.", "error")

    @work(thread=True, group="reply", exit_on_error=False)
    def _write_reply(self, model: ChatModel, messages: list[dict], settings: ChatSettings,
                     cancel: threading.Event, pieces: queue.SimpleQueue) -> None:
        # written on the thread that loaded the model (backend.ModelThread says why)
        self.model_thread.call(self._reply_body, model, messages, settings, cancel, pieces)

    def _reply_body(self, model: ChatModel, messages: list[dict], settings: ChatSettings,
                    cancel: threading.Event, pieces: queue.SimpleQueue) -> None:
        """Every outcome, failure included, ends with one ReplyEnded on the queue."""
        from ...remote import RemoteChat

        try:
            # a server samples by OpenAI's fields, read off the settings: a remote chat loads no torch
            params = settings if isinstance(model, RemoteChat) else settings.sampling_params()
            room = reply_room(settings.max_tokens, model.ctx)
            if settings.docs or settings.file or "#" in messages[-1]["content"]:
                from ...docs.attach import ground_chat, untagged_line

                messages, passages = ground_chat(messages, settings.docs, settings.file, model.ctx, room,
                                                 lambda text: model.count_tokens([{"role": "user", "content": text}]),
                                                 notice=lambda tags: pieces.put(_Said(untagged_line(tags, "F9"))))
                if passages is not None:
                    pieces.put(_Sources([p.to_dict() for p in passages]))
            # a server's context is its own setting: no --ctx of ours changes it
            larger = {} if self.remote is None else {"larger": "pick a model the server runs with a longer context"}
            fitted = fit_to_context(messages, model.count_tokens, model.ctx, room, getattr(model, "max_ctx", None),
                                    **larger)
            pieces.put(PromptFitted(fitted.prompt_tokens, fitted.dropped, model.ctx))
            if cancel.is_set():  # Esc while documents were searched or the conversation was counted
                pieces.put(ReplyEnded(stopped=True, context_used=model.context_used()))
                return
            for piece in model.stream(fitted.messages, params, settings.max_tokens, cancel):
                pieces.put(piece)
            stats = model.last
            pieces.put(ReplyEnded(stopped=cancel.is_set() or stats.stopped, new_tokens=stats.new_tokens,
                                  tokens_per_s=stats.tokens_per_s, context_used=model.context_used()))
        except PromptTooLong as e:
            pieces.put(ReplyEnded(refused=str(e)))
        except (UserError, ValueError) as e:
            pieces.put(ReplyEnded(error=str(e), stopped=True))
        except Exception as e:  # a bug or out of memory: keep the app and the partial reply
            pieces.put(ReplyEnded(error=f"{type(e).__name__}: {e}", stopped=True))

    async def _drain(self) -> None:
        reply = self.reply
        if reply is None:
            return
        text: list[str] = []
        end: ReplyEnded | None = None
        while end is None:
            try:
                item = reply.pieces.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):
                text.append(item)
            elif isinstance(item, _Sources):
                reply.sources = item.passages
            elif isinstance(item, _Said):
                await self._notice(item.text, "warning", before=reply.view)
            elif isinstance(item, PromptFitted):
                self.query_one(StatusLine).ctx_used = reply.prompt_tokens = item.prompt_tokens
                if item.dropped:
                    kept = " (the system prompt stays)" if self.settings.system else ""
                    await self._notice(f"The conversation no longer fits the {item.ctx}-token context: the oldest "
                                       f"{item.dropped} messages are left out of this reply{kept}.", "warning",
                                       before=reply.view)
            else:
                end = item
        reply.unshown += "".join(text)
        if reply.written_at is not None:  # a drain later: the last update's frames are drawn
            began, cpu = reply.written_at
            reply.show_after, reply.written_at = began + self._write_interval(reply, time.thread_time() - cpu), None
        if reply.unshown and (end is not None or time.monotonic() >= reply.show_after):
            shown, reply.unshown = reply.unshown, ""
            reply.written_at, reply.show_after = (time.monotonic(), time.thread_time()), float("inf")
            if end is None and time.monotonic() >= reply.numbers_after:
                self._show_numbers(reply)
            await reply.view.write(shown)
        if end is not None:
            await self._finish(reply, end)

    @staticmethod
    def _write_interval(reply: _Reply, cost_s: float) -> float:
        """Seconds from one update of the reply to the next: the last one's cost (this thread's
        CPU time from its start to the next drain, which its frames come before) over UI_SHARE,
        between WRITE_INTERVAL_S and MAX_WRITE_INTERVAL_S; and at least twice the last append's
        own time: a long list is one Markdown block, re-parsed whole at every append (measured:
        10.9 tok/s during a long list before)."""
        return max(WRITE_INTERVAL_S, 2 * reply.view.append_s, min(cost_s / UI_SHARE, MAX_WRITE_INTERVAL_S))

    def _show_numbers(self, reply: _Reply) -> None:
        """Context used and tokens/s while the reply is written, with its text, at most 4 times a
        second: the engine updates its numbers at every token (plain ints, read here without a lock)."""
        reply.numbers_after = time.monotonic() + NUMBERS_INTERVAL_S
        if self.model is None:
            return
        last, status = self.model.last, self.query_one(StatusLine)
        status.ctx_used = reply.prompt_tokens + last.new_tokens
        if last.tokens_per_s > 0:
            status.tokens_per_s = last.tokens_per_s

    async def _finish(self, reply: _Reply, end: ReplyEnded) -> None:
        # This runs inside the drain timer's task, and stopping a timer cancels its task: the timer
        # stops last, when nothing is left to await.
        try:
            await self._settle(reply, end)
        finally:
            reply.timer.stop()

    async def _settle(self, reply: _Reply, end: ReplyEnded) -> None:
        status = self.query_one(StatusLine)
        status.activity = ""
        if end.refused:
            # still busy while the prompt is taken back: a prompt sent meanwhile would be taken back
            # instead, or go with a chat deleted for being empty
            try:
                await self._refuse(reply, end.refused)
            finally:
                self.reply = None
            return
        self.reply = None
        if not reply.view.content:
            await reply.view.remove()
            await self._notice(end.error or "Stopped before the first word.", "error" if end.error else "info")
        elif not self.history.exists(reply.conversation_id):
            await self._notice("This chat was deleted in another window, so the reply is not saved.", "error")
        else:
            meta = {"timings": {"new_tokens": end.new_tokens, "tokens_per_s": round(end.tokens_per_s, 2)},
                    "ran_on": {"device": self.model.device if self.model else ""}}
            if reply.sources is not None:  # kept with the reply: the history and the export cite them
                meta["sources"] = reply.sources
            saved = self.history.add_message(reply.conversation_id, "assistant", reply.view.content,
                                             stopped=end.stopped, model=reply.view.who, meta=meta)
            reply.view.message_id = saved.id
            if end.stopped:
                reply.view.mark_stopped()
            if end.error:
                await self._notice(f"The reply broke off: {end.error}", "error")
            if reply.sources is not None:
                reply.view.meta = {"sources": reply.sources}
                await self.query_one(Transcript).add(Notice(_sources_line(reply.sources), "sources"))
            status.tokens_per_s = end.tokens_per_s
            status.ctx_used = end.context_used
            status.activity = "stopped" if end.stopped else ""
        self._refresh_sidebar()
        # the count the chat reopens with (its saved turns as the next prompt starts them: the
        # reply's end-of-turn tokens too), not the cache's, which stops before them: a reopened
        # chat showed 7 tokens more than the same chat a moment before. A server's count is exact
        # where ours of its model would be an estimate: kept.
        if self.remote is None:
            self._measure_context()

    async def _refuse(self, reply: _Reply, why: str) -> None:
        """The prompt does not fit at all: take it back out of the chat and give it back to edit."""
        await reply.view.remove()
        await self._take_back_prompt(reply.conversation_id)
        await self._notice(f"Not sent: {why}.", "error")

    async def _take_back_prompt(self, conversation_id: int | None = None) -> None:
        """The last prompt out of the chat and back in the prompt box (unless something is typed there)."""
        conversation_id = conversation_id or self.conversation.id
        messages = self.history.messages(conversation_id)
        taken = bool(messages) and messages[-1].role == "user"
        if taken:
            self.history.delete_message(messages[-1].id)
            views = [v for v in self.query(MessageView) if v.message_id == messages[-1].id]
            for v in views:
                await v.remove()
            prompt = self.query_one(PromptInput)
            if not prompt.text.strip():
                prompt.text = messages[-1].content
        if len(messages) == int(taken):
            # nothing else in the chat: it was made for this prompt, which, unsent, leaves no empty chat
            if self.conversation is not None and self.conversation.id == conversation_id:
                self.draft_settings, self.conversation = self.conversation.settings, None
                self.history.set_state("last_chat", None)
            self.history.delete(conversation_id)
            self._refresh_sidebar()

    async def _notice(self, text: str, kind: str = "info", before=None) -> None:
        await self.query_one(Transcript).add(Notice(text, kind), before=before)


def _sources_line(sources: list[dict]) -> str:
    """`Sources: [1] path:line · [2] path:p.3`, or `Sources: no source found`."""
    from ...docs.retrieve import Passage, sources_block

    passages = [Passage(s["path"], s["line"], s["page"], "", n=s["n"]) for s in sources]
    return sources_block(passages).replace("\n", " · ").replace("Sources: · ", "Sources: ")


def _file_name(title: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_ " else " " for c in title).split()
    return ("-".join(safe)[:60] or "chat") + ".md"
