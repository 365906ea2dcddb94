"""A fake Telegram Bot API on 127.0.0.1, speaking the real wire format (``POST /bot<TOKEN>/<method>``, form or
JSON parameters, ``{"ok": true, "result": ...}`` answers), for tests of :mod:`pricelevel.telegram`.

It answers ``getMe``, ``deleteWebhook`` (``drop_pending_updates`` clears the pending updates), long-polled
``getUpdates`` (held until an update arrives or ``timeout`` passes; ``offset`` confirms), ``sendMessage``
(recorded in :attr:`FakeBotAPI.sent`), ``editMessageText`` (:attr:`FakeBotAPI.edited`), ``setMyCommands``
(:attr:`FakeBotAPI.menu`) and ``answerCallbackQuery`` (:attr:`FakeBotAPI.answered`, :attr:`FakeBotAPI.notices`);
401 for any other token, 404 for any other method. With ``parse_mode=HTML`` a text is checked as Telegram does
(only its tags, balanced, entities known: 400 "can't parse entities" otherwise) and recorded as a person sees it
(``text``: tags removed, entities decoded) and as sent (``html``). Tests inject updates (:meth:`FakeBotAPI.message`, :meth:`FakeBotAPI.press`), 429s with ``retry_after``
(:meth:`FakeBotAPI.fail_next`) and outages (:attr:`FakeBotAPI.down`: 502 for everything, as JSON or, with
:attr:`FakeBotAPI.down_html`, as a proxy's HTML page; :attr:`FakeBotAPI.hang_s`: every answer that late, so
clients time out; :meth:`FakeBotAPI.go_away` / :meth:`FakeBotAPI.come_back`: the port stops listening, so
connections are refused, and listens again on the same port).
"""

from __future__ import annotations

import html
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Pricelevel", "username": "pricelevel_test_bot"}


class _QuietHandler(WSGIRequestHandler):
    """No request log lines: they would carry the token (the real server keeps its logs to itself too)."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass


#: The tags Telegram's HTML parse mode accepts.
TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "tg-spoiler", "blockquote",
        "span", "tg-emoji"}


_BARE_AMP = re.compile(r"&(?!(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);)")


class HTMLRefused(ValueError):
    pass


class _Visible(HTMLParser):
    """What a person sees of a text in HTML parse mode; refuses what Telegram refuses."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.parts: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in TAGS:
            raise HTMLRefused(f"Can't parse entities: unsupported start tag \"{tag}\"")
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            raise HTMLRefused(f"Can't parse entities: can't find end tag corresponding to start tag \"{tag}\"")

    def handle_data(self, data: str) -> None:
        if "<" in data or ">" in data:
            raise HTMLRefused("Can't parse entities: unexpected end tag")
        self.parts.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in ("lt", "gt", "amp", "quot"):
            raise HTMLRefused(f"Can't parse entities: unsupported entity &{name};")
        self.parts.append(html.unescape(f"&{name};"))

    def handle_charref(self, name: str) -> None:
        self.parts.append(html.unescape(f"&#{name};"))


def visible(text: str, parse_mode: str | None) -> str:
    """``text`` as Telegram shows it (raises :class:`HTMLRefused` where Telegram answers 400)."""
    if (parse_mode or "").upper() != "HTML":
        return text
    if _BARE_AMP.search(text):
        raise HTMLRefused("Can't parse entities: a bare & (not escaped)")
    parser = _Visible()
    parser.feed(text)
    parser.close()
    if parser.open:
        raise HTMLRefused(f"Can't parse entities: can't find end tag corresponding to start tag \"{parser.open[-1]}\"")
    return "".join(parser.parts)


@dataclass(frozen=True)
class Sent:
    chat_id: int
    #: What the person sees (HTML tags removed, entities decoded).
    text: str
    reply_markup: dict | None
    at: float
    message_id: int = 0
    #: The text as the bot sent it (with its HTML tags).
    html: str = ""
    parse_mode: str | None = None
    disable_notification: bool = False

    def buttons(self) -> dict[str, str]:
        """``label -> callback_data`` of the inline keyboard."""
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return {button["text"]: button["callback_data"] for row in rows for button in row}


@dataclass(frozen=True)
class Edit:
    """An ``editMessageText``: the message ``message_id`` of ``chat_id`` now says ``text`` (its buttons: ``reply_markup``)."""

    chat_id: int
    message_id: int
    text: str
    reply_markup: dict | None
    at: float
    html: str = ""


class FakeBotAPI:
    """See the module docstring. Use as a context manager; :attr:`url` is the ``telegram.base_url``."""

    def __init__(self, token: str, port: int = 0) -> None:
        self.token = token
        self._cond = threading.Condition()
        self._updates: list[dict[str, Any]] = []
        self._update_id = 100
        self._message_id = 1
        self._faults: deque[tuple[str, int, int]] = deque()
        self._closing = False
        self.sent: list[Sent] = []
        self.edited: list[Edit] = []
        #: ``setMyCommands``: the "/" menu as last set (``[{"command": ..., "description": ...}]``).
        self.menu: list[dict[str, str]] = []
        self.calls: list[tuple[str, float]] = []
        self.answered: list[str] = []
        #: The text of each ``answerCallbackQuery`` (``None``: none), in order.
        self.notices: list[str | None] = []
        self.polls = 0
        #: True: every request gets 502 Bad Gateway (an outage).
        self.down = False
        #: True: every request gets 502 with an HTML page (a proxy in front of a Telegram that is away).
        self.down_html = False
        #: Seconds every request waits before it is answered (a hanging Telegram: clients time out).
        self.hang_s = 0.0
        self._listen(port)
        self.url = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        self._server = make_server("127.0.0.1", port, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-bot-api", daemon=True)
        self._serving = False

    def __enter__(self) -> FakeBotAPI:
        self._thread.start()
        self._serving = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stop_listening()

    def _stop_listening(self) -> None:
        if self._serving:
            self._server.shutdown()
            self._thread.join(5)
            self._serving = False
        self._server.server_close()

    def go_away(self) -> None:
        """Telegram unreachable: nothing listens on the port any more (connections are refused)."""
        self._stop_listening()

    def come_back(self) -> None:
        """Listen again, on the same port (after :meth:`go_away`)."""
        self._listen(self.port)
        self._thread.start()
        self._serving = True

    # ------------------------------------------------------------------------------------------ injection

    def message(self, chat_id: int, text: str, user_id: int | None = None, chat_type: str = "private",
                username: str = "alice") -> int:
        """A user sends ``text`` (a command gets its ``bot_command`` entity); returns the update id."""
        message: dict[str, Any] = {
            "message_id": self._next_message_id(), "date": int(time.time()), "chat": _chat(chat_id, chat_type),
            "from": _user(user_id if user_id is not None else chat_id, username), "text": text,
        }
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        return self._add({"message": message})

    def press(self, chat_id: int, data: str, user_id: int | None = None, chat_type: str = "private",
              username: str = "alice", message_id: int | None = None) -> int:
        """A user presses an inline button carrying ``data`` under the bot's message ``message_id`` (default: a
        new id, as for a message the fake never sent)."""
        uid = user_id if user_id is not None else chat_id
        message = {"message_id": message_id or self._next_message_id(), "date": int(time.time()),
                   "chat": _chat(chat_id, chat_type), "from": BOT_USER, "text": "(question)"}
        return self._add({"callback_query": {"id": f"cq{self._update_id}", "from": _user(uid, username),
                                             "chat_instance": f"ci{chat_id}", "data": data, "message": message}})

    def fail_next(self, method: str, status: int = 429, retry_after: int = 1, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` fail with ``status`` (429: with ``retry_after`` seconds)."""
        for _ in range(times):
            self._faults.append((method, status, retry_after))

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._updates)

    def texts(self, chat_id: int | None = None) -> list[str]:
        return [s.text for s in list(self.sent) if chat_id is None or s.chat_id == chat_id]

    # ------------------------------------------------------------------------------------------ server

    def _add(self, update: dict[str, Any]) -> int:
        with self._cond:
            self._update_id += 1
            self._updates.append({"update_id": self._update_id, **update})
            self._cond.notify_all()
            return self._update_id

    def _next_message_id(self) -> int:
        with self._cond:
            self._message_id += 1
            return self._message_id

    def _wsgi(self, environ: dict, start_response: Any) -> Any:
        return self._handle(Request(environ))(environ, start_response)

    def _handle(self, request: Request) -> Response:
        prefix, _, method = request.path.lstrip("/").partition("/")
        self.calls.append((method, time.monotonic()))
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.down_html:
            return Response("<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
                            "</center><hr><center>nginx</center></body></html>", status=502, mimetype="text/html")
        if self.down:
            return _error(502, "Bad Gateway")
        if prefix != f"bot{self.token}":
            return _error(401, "Unauthorized")
        for i, (name, status, retry_after) in enumerate(self._faults):
            if name == method:
                del self._faults[i]
                if status == 429:
                    return _error(429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after})
                return _error(status, "injected failure")
        params = {**request.form.to_dict(), **(request.get_json(silent=True) or {})}
        answer = getattr(self, f"_api_{method}", None)
        if answer is None:
            return _error(404, "Not Found: method not found")
        try:
            return _ok(answer(params))
        except HTMLRefused as exc:
            return _error(400, f"Bad Request: {exc}")

    def _api_getMe(self, params: dict) -> dict:
        return BOT_USER

    def _api_deleteWebhook(self, params: dict) -> bool:
        if str(params.get("drop_pending_updates", "")).lower() in ("true", "1"):
            with self._cond:
                self._updates.clear()
        return True

    def _api_getUpdates(self, params: dict) -> list[dict]:
        offset = int(params.get("offset") or 0)
        deadline = time.monotonic() + float(params.get("timeout") or 0)
        with self._cond:
            self.polls += 1
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while not self._updates and not self._closing and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return list(self._updates)

    def _api_sendMessage(self, params: dict) -> dict:
        markup = _json(params.get("reply_markup"))
        chat_id, parse_mode = int(params["chat_id"]), params.get("parse_mode")
        text = visible(params["text"], parse_mode)
        message_id = self._next_message_id()
        silent = str(params.get("disable_notification", "")).lower() in ("true", "1")
        self.sent.append(Sent(chat_id, text, markup, time.monotonic(), message_id, params["text"], parse_mode, silent))
        return {"message_id": message_id, "date": int(time.time()), "chat": _chat(chat_id, "private"),
                "from": BOT_USER, "text": text}

    def _api_editMessageText(self, params: dict) -> dict:
        chat_id, message_id = int(params["chat_id"]), int(params["message_id"])
        text = visible(params["text"], params.get("parse_mode"))
        self.edited.append(Edit(chat_id, message_id, text, _json(params.get("reply_markup")), time.monotonic(),
                                params["text"]))
        return {"message_id": message_id, "date": int(time.time()), "edit_date": int(time.time()),
                "chat": _chat(chat_id, "private"), "from": BOT_USER, "text": text}

    def _api_setMyCommands(self, params: dict) -> bool:
        self.menu = _json(params["commands"])
        return True

    def _api_answerCallbackQuery(self, params: dict) -> bool:
        self.answered.append(params["callback_query_id"])
        self.notices.append(params.get("text"))
        return True


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _chat(chat_id: int, chat_type: str) -> dict[str, Any]:
    chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
    if chat_type == "private":
        chat["first_name"] = "Alice"
    else:
        chat["title"] = "Trading desk"
    return chat


def _user(user_id: int, username: str) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": username.title(), "username": username}


def _ok(result: Any) -> Response:
    return Response(json.dumps({"ok": True, "result": result}), mimetype="application/json")


def _error(status: int, description: str, parameters: dict | None = None) -> Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return Response(json.dumps(body), status=status, mimetype="application/json")
