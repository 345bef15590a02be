"""The JSON commands clients send, read once for every transport (HTTP, the WebSocket, MQTT).

    create:     {"session": NAME?, "avatar": ID|"default", "audio": {"rate", "channels"}, "options": {}}
    a session:  {"cmd": "interrupt"} | {"cmd": "avatar", "avatar": ID} | {"cmd": "options", "options": {}}
                | {"cmd": "close"}

Every failure is a ``CommandError`` whose message is meant for the client; nothing here raises
anything else for bad input, so a transport can answer (400, an error event) and go on.
"""

from __future__ import annotations

import json

from stream.avatars import AvatarStore, UnknownAvatar
from stream.live import LiveSession
from stream.session_options import AudioFormat, OptionError, SessionOptions
from stream.sessions import SessionError, SessionManager

SESSION_COMMANDS = ("interrupt", "avatar", "options", "close")


class CommandError(ValueError):
    pass


def parse_json(payload: bytes | str) -> dict:
    """A JSON object, or CommandError.

    Python's parser recurses once per nesting level: a body of 100 000 brackets ends in a
    RecursionError, which is the sender's error like any other malformed JSON.
    """
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"not JSON ({exc})") from None
    except RecursionError:
        raise CommandError("not JSON this server reads: nested too deeply") from None
    if not isinstance(body, dict):
        raise CommandError("a command must be a JSON object")
    return body


async def create_program_session(manager: SessionManager, avatars: AvatarStore, body: dict) -> LiveSession:
    """A started ``program`` session (an avatar driven by audio a program sends).

    Raises CommandError for bad input, sessions.SessionLimit when the server is full.
    """
    try:
        audio = AudioFormat.from_json(body.get("audio"))
        options = SessionOptions.from_json(body.get("options"))
        avatar = avatars.get(body.get("avatar"))
        session = manager.create("program", name=body.get("session"), avatar=avatar.playable(),
                                 audio_format=audio, options=options)
    except (OptionError, UnknownAvatar, SessionError) as exc:
        raise CommandError(str(exc)) from None
    await session.start()
    return session


async def apply(session: LiveSession, avatars: AvatarStore, body: dict) -> dict:
    """Carry out one command for ``session``; returns the event it sent to the session's listeners."""
    command = body.get("cmd")
    try:
        if command == "interrupt":
            return session.interrupt()
        if command == "avatar":
            return session.switch_avatar(avatars.get(body.get("avatar")).playable(),
                                         body.get("avatar") or "default")
        if command == "options":
            return session.update_options(body.get("options"))
        if command == "close":
            return await session.close(reason="closed by a client")
    except (OptionError, UnknownAvatar, ValueError) as exc:
        raise CommandError(str(exc)) from None
    raise CommandError(f"unknown command {command!r}: use one of {', '.join(SESSION_COMMANDS)}")
