"""MQTT control (transport/mqtt.py) against a real broker: Debian's mosquitto, started here on a
free loopback port with its own config, and restarted mid-session.

A program drives an avatar over MQTT while an aiortc viewer watches over WebRTC; the broker dies
and comes back under a running session; malformed messages of every kind get ``error`` events
while another session keeps producing frames; the server's retained status is "online" while the
bridge runs and "offline" after it (the last will when the link dies, a publish on a clean stop).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import aiomqtt
import numpy as np
import pytest

from bench.mosquitto import MOSQUITTO, Mosquitto
from media_helpers import ServerThread, Viewer
from stream.avatars import AvatarStore
from stream.sessions import SessionManager
from transport.mqtt import MqttBridge, MqttSettings

pytestmark = pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs Debian's mosquitto broker at "
                                "/usr/sbin/mosquitto (apt-get install mosquitto); the test starts its own")
RATE = 24_000
FPS = 25
TIMEOUT = 60


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    running = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(broker, media):
    mqtt = MqttSettings("127.0.0.1", broker.port)
    with ServerThread(max_sessions=3, avatar=str(media / "portrait.png"), mqtt=mqtt) as running:
        yield running


class Probe:
    """A test's MQTT client: publishes, and keeps what its subscriptions bring with arrival times."""

    def __init__(self, port: int, *topics: str, identifier: str | None = None) -> None:
        self.client = aiomqtt.Client("127.0.0.1", port, identifier=identifier)
        self.topics = topics
        self.messages: list[tuple[float, str, bytes, bool]] = []  # (arrival, topic, payload, retained)

    async def __aenter__(self) -> "Probe":
        await self.client.__aenter__()
        if self.topics:
            await self.client.subscribe([(topic, 1) for topic in self.topics])
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        try:
            await self.client.__aexit__(*exc)
        except aiomqtt.MqttError:
            pass  # the broker went away first

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                self.messages.append((time.monotonic(), message.topic.value, message.payload, message.retain))
        except aiomqtt.MqttError:
            pass

    async def publish(self, topic: str, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(topic, data, qos=1)

    async def wait_for(self, topic: str, match=lambda payload: True, after: int = 0,
                       timeout: float = 10) -> tuple[float, bytes]:
        """The first message on ``topic`` (from index ``after``) whose payload matches."""
        deadline = time.monotonic() + timeout
        while True:
            for at, seen, payload, _ in self.messages[after:]:
                if seen == topic and match(payload):
                    return at, payload
            assert time.monotonic() < deadline, (f"nothing matching on {topic} in {timeout} s: "
                                                 f"{[(t, p[:200]) for _, t, p, _ in self.messages]}")
            await asyncio.sleep(0.02)

    async def event(self, topic: str, name: str, after: int = 0, timeout: float = 10) -> tuple[float, dict]:
        at, payload = await self.wait_for(topic, lambda p: p.startswith(b"{") and json.loads(p)["event"] == name,
                                          after, timeout)
        return at, json.loads(payload)

    async def status(self, topic: str, match=lambda status: True, after: int = 0,
                     timeout: float = 10) -> dict:
        _, payload = await self.wait_for(topic, lambda p: p.startswith(b"{") and match(json.loads(p)),
                                         after, timeout)
        return json.loads(payload)


async def speak(probe: Probe, topic: str, pcm: bytes, speed: float = 2.0, lead: float = 0.3) -> float:
    """The first ``lead`` seconds of ``pcm`` in one message (a TTS's first phrase), the rest in 20-100 ms
    chunks at ``speed`` times real time; returns its duration.

    An utterance ends wherever the session's buffer runs dry. Paced from a first small chunk, the
    buffer would hold only tens of milliseconds at first, and one message held up that long on this
    loaded 2-core machine (70 ms seen) would end the utterance there.
    """
    rng = np.random.default_rng(5)
    sent = int(lead * RATE) * 2
    await probe.publish(topic, pcm[:sent])
    started = time.monotonic()
    while sent < len(pcm):
        size = int(rng.integers(20, 100) * RATE / 1000) * 2
        await probe.publish(topic, pcm[sent : sent + size])
        sent += size
        await asyncio.sleep(max(0.0, started + (sent / 2 / RATE - lead) / speed - time.monotonic()))
    return len(pcm) / 2 / RATE


def create(name: str, **fields) -> dict:
    return {"cmd": "create", "session": name, "avatar": "default", "audio": {"rate": RATE, "channels": 1},
            **fields}


def mouth(image: np.ndarray) -> np.ndarray:
    """The lower middle of the 640 px portrait, where its mouth is."""
    return image[300:520, 200:440].astype(np.int16)


def test_a_program_drives_an_avatar_over_mqtt_and_a_viewer_watches(server, broker, speech_24k):
    avatar = server.server.avatars.default.frames[0]

    async def run():
        async with Probe(broker.port, "lipstream/speaker/#", "lipstream/status") as probe, \
                aiohttp.ClientSession() as http:
            online = await probe.status("lipstream/status")
            # Late windows are generated anyway (not passed through unchanged), so that a loaded machine
            # still shows the model's mouth.
            await probe.publish("lipstream/control", create("speaker", options={"late_after": None}))
            await probe.event("lipstream/speaker/events", "created")
            described = await probe.status("lipstream/speaker/status")
            listed = await probe.status("lipstream/status", lambda s: "speaker" in s["sessions"])
            viewer = Viewer(server.url, "speaker")
            try:
                status, answer = await viewer.connect(http)
                assert status == 200, answer
                await viewer.wait_for_frames(50, TIMEOUT)  # idle first: 2 s
                speech_from = time.monotonic()
                duration = await speak(probe, "lipstream/speaker/audio", speech_24k[: 2 * RATE * 4])
                started_at, started = await probe.event("lipstream/speaker/events", "speech_started")
                ended_at, ended = await probe.event("lipstream/speaker/events", "speech_ended", timeout=TIMEOUT)
                await asyncio.sleep(1.5)  # idle after
            finally:
                await viewer.close()
            await probe.publish("lipstream/control", {"cmd": "close", "session": "speaker"})
            _, closed = await probe.event("lipstream/speaker/events", "closed")
            await probe.wait_for("lipstream/speaker/status", lambda payload: payload == b"")
            left = await probe.status("lipstream/status", lambda s: "speaker" not in s["sessions"])
        return (online, described, listed, speech_from, duration, started_at, started, ended_at, ended,
                closed, left, viewer.frames)

    (online, described, listed, speech_from, duration, started_at, started, ended_at, ended, closed, left,
     frames) = asyncio.run(run())
    assert online == {"state": "online", "sessions": [], "max_sessions": 3}
    assert described["session"] == "speaker" and described["kind"] == "program"
    assert described["options"]["late_after"] is None
    assert listed["sessions"] == ["speaker"] and left["sessions"] == []
    assert abs(ended["position"] - duration) <= 1 / FPS, (ended, duration)
    assert abs((ended["media_time"] - started["media_time"]) - duration) <= 1 / FPS
    assert closed["reason"] == "closed by a client"

    # The mouth moves while the speech plays and is the avatar's own in silence, before and after:
    # its picture up to the video codec's noise (VP8 refines a still picture over a second or so).
    own = mouth(avatar)

    def change(image) -> float:
        return float(np.abs(mouth(image) - own).mean())

    idle_before = [change(image) for at, image in frames[25:] if at < speech_from]
    idle_after = [change(image) for at, image in frames if at > ended_at + 0.5]  # past VAD and cross-fade
    speaking = [change(image) for at, image in frames if started_at + 0.3 <= at <= ended_at - 0.3]
    assert idle_before and idle_after and speaking
    assert np.median(idle_before) < 8 and np.median(idle_after) < 8 and max(idle_after) < 15, \
        f"idle frames are not the avatar's picture: {np.median(idle_before):.1f}, {idle_after}"
    assert np.median(speaking) > 5 * max(np.median(idle_before), np.median(idle_after), 1.0), \
        (np.median(speaking), np.median(idle_before), np.median(idle_after))
    print(f"mouth change from the avatar's picture: {np.median(idle_before):.1f} idle before the speech, "
          f"{np.median(speaking):.1f} speaking, {np.median(idle_after):.1f} idle after it")


def test_the_session_goes_on_while_the_broker_restarts(server, broker, speech_24k):
    async def run():
        async with Probe(broker.port, "lipstream/steady/#") as probe:
            await probe.publish("lipstream/control", create("steady"))
            await probe.event("lipstream/steady/events", "created")
            await probe.publish("lipstream/steady/audio", speech_24k[: 2 * RATE * 5])
            await probe.event("lipstream/steady/events", "speech_started")
            before = await probe.status("lipstream/steady/status", after=len(probe.messages))
        broker.kill()
        killed = time.monotonic()
        await asyncio.sleep(1.0)
        broker.start()
        async with Probe(broker.port, "lipstream/steady/#", "lipstream/status") as probe:
            # The broker forgot every retained message: these are the bridge's, after reconnecting.
            online = await probe.status("lipstream/status", timeout=15)
            after = await probe.status("lipstream/steady/status",
                                       lambda s: s["frames_out"] >= before["frames_out"] + FPS, timeout=15)
            reconnected = time.monotonic() - killed
            seen = len(probe.messages)
            await probe.publish("lipstream/steady/control", {"cmd": "interrupt"})
            _, interrupted = await probe.event("lipstream/steady/events", "interrupted", after=seen)
            await probe.publish("lipstream/steady/control", {"cmd": "close"})
            await probe.event("lipstream/steady/events", "closed", after=seen)
        return before, online, after, reconnected, interrupted

    before, online, after, reconnected, interrupted = asyncio.run(run())
    assert online["state"] == "online" and "steady" in online["sessions"]
    # The speech went on playing from the session's buffer while the broker was away.
    assert after["buffered_seconds"] < before["buffered_seconds"] - 0.5, (before, after)
    assert interrupted["position"] > 1.0 and interrupted["dropped_seconds"] > 0, interrupted
    print(f"broker restart: status republished {reconnected:.1f} s after the kill, "
          f"{after['frames_out'] - before['frames_out']} frames out meanwhile")


MALFORMED = [  # (topic, payload, where the error goes, what its message says)
    ("lipstream/control", b"{not json", "lipstream/events", "not JSON"),
    ("lipstream/control", b"[1, 2]", "lipstream/events", "JSON object"),
    ("lipstream/control", b"\xff\xfe\x00\x01binary", "lipstream/events", "binary payload"),
    ("lipstream/control", {"cmd": "dance"}, "lipstream/events", "unknown command 'dance'"),
    ("lipstream/control", {"cmd": "close", "session": "ghost"}, "lipstream/events", "no session 'ghost'"),
    ("lipstream/control", {"cmd": "create", "avatar": "default"}, "lipstream/events", 'needs "session"'),
    ("lipstream/control", create("a/b"), "lipstream/events", "letters, digits"),
    ("lipstream/control", create("other"), "lipstream/events", "exists already"),
    ("lipstream/control", create("slow", audio={"rate": 1000}), "lipstream/events", "audio rate 1000 Hz"),
    ("lipstream/control", create("fast", audio={"rate": 10**9}), "lipstream/events", "audio rate 1000000000 Hz"),
    ("lipstream/control", create("many", audio={"rate": RATE, "channels": 5}), "lipstream/events",
     "audio channels 5"),
    ("lipstream/control", create("odd", audio="loud"), "lipstream/events", '"audio" must be'),
    ("lipstream/control", create("who", avatar="nobody"), "lipstream/events", "unknown avatar 'nobody'"),
    ("lipstream/control", create("tuned", options={"stride": 99}), "lipstream/events", "'stride': 99"),
    ("lipstream/ghost/audio", b"\0\0" * 480, "lipstream/events", "no session 'ghost'"),
    ("lipstream/ghost/control", {"cmd": "interrupt"}, "lipstream/events", "no session 'ghost'"),
    ("lipstream/other/audio", b"\x01\x02\x03", "lipstream/other/events", "not a whole number"),
    ("lipstream/other/audio", b"", "lipstream/other/events", "empty audio chunk"),
    ("lipstream/other/control", b"{not json", "lipstream/other/events", "not JSON"),
    ("lipstream/other/control", b"\x00\x9f\x92\x96", "lipstream/other/events", "binary payload"),
    ("lipstream/other/control", {"cmd": "dance"}, "lipstream/other/events", "unknown command 'dance'"),
    ("lipstream/other/control", {"cmd": "options", "options": {"stride": 99}}, "lipstream/other/events",
     "'stride': 99"),
    ("lipstream/other/control", {"cmd": "options", "options": {"vad": False}}, "lipstream/other/events",
     "'vad' is fixed"),
    ("lipstream/other/control", {"cmd": "avatar", "avatar": "nobody"}, "lipstream/other/events",
     "unknown avatar 'nobody'"),
]


def test_malformed_messages_get_error_events_and_other_sessions_go_on(server, broker, speech_24k):
    async def run():
        async with Probe(broker.port, "lipstream/events", "lipstream/+/events", "lipstream/other/status",
                         "bare/#") as probe:
            await probe.publish("lipstream/control", create("other"))
            await probe.event("lipstream/other/events", "created")
            await probe.publish("lipstream/other/audio", speech_24k[: 2 * RATE * 8])
            first = await probe.status("lipstream/other/status", after=len(probe.messages))
            errors = []
            for topic, payload, where, _ in MALFORMED:
                seen = len(probe.messages)
                await probe.publish(topic, payload)
                errors.append((await probe.event(where, "error", after=seen))[1])
            # The other session kept producing frames through all of it, and still takes commands.
            seen = len(probe.messages)
            last = await probe.status("lipstream/other/status",
                                      lambda s: s["frames_out"] >= first["frames_out"] + FPS, after=seen)
            seen = len(probe.messages)
            await probe.publish("lipstream/other/control", {"cmd": "interrupt"})
            _, interrupted = await probe.event("lipstream/other/events", "interrupted", after=seen)
            # A full server (3 sessions) refuses a fourth.
            for name in ("extra1", "extra2"):
                await probe.publish("lipstream/control", create(name))
                await probe.event(f"lipstream/{name}/events", "created")
            seen = len(probe.messages)
            await probe.publish("lipstream/control", create("extra3"))
            errors.append((await probe.event("lipstream/events", "error", after=seen))[1])
            for name in ("extra1", "extra2"):
                await probe.publish(f"lipstream/{name}/control", {"cmd": "close"})
            bare = await no_default_avatar(probe, broker.port)
            await probe.publish("lipstream/control", {"cmd": "close", "session": "other"})
            await probe.event("lipstream/other/events", "closed")
        return first, errors, last, interrupted, bare

    first, errors, last, interrupted, bare = asyncio.run(run())
    assert len(errors) == len(MALFORMED) + 1
    assert "full (3 sessions)" in errors.pop()["message"]
    for (topic, _, where, expected), error in zip(MALFORMED, errors):
        assert expected in error["message"], (topic, expected, error)
        if where == "lipstream/events":
            assert error["topic"] == topic, error
        else:
            assert error["session"] == "other" and error["message"].startswith(topic), error
    assert last["frames_out"] >= first["frames_out"] + FPS and interrupted["session"] == "other"
    replayed, no_avatar, online, offline = bare
    assert "retained" in replayed["message"] and replayed["topic"] == "bare/control", replayed
    assert "no default one" in no_avatar["message"] and no_avatar["session"] == "nobody"
    assert online["state"] == "online" and offline == {"state": "offline", "sessions": [], "max_sessions": 2}
    print("errors:", *(f"\n  {e['session']}: {e['message']}" for e in errors))


async def no_default_avatar(probe: Probe, port: int) -> tuple[dict, dict, dict, dict]:
    """A bridge over a server with no default avatar (prefix "bare"): a create without one is refused,
    and so is a command left retained on the broker (it would be replayed at every reconnection)."""
    await probe.client.publish("bare/control", json.dumps(create("replayed")).encode(), qos=1, retain=True)
    bridge = MqttBridge(SessionManager(None, max_sessions=2), AvatarStore(),
                        MqttSettings("127.0.0.1", port, prefix="bare"))
    bridge.start()
    try:
        online = await probe.status("bare/status", lambda s: s["state"] == "online")
        _, replayed = await probe.event("bare/events", "error")
        await probe.client.publish("bare/control", b"", qos=1, retain=True)  # deletes the retained command
        seen = len(probe.messages)
        await probe.publish("bare/control", {"cmd": "create", "session": "nobody", "audio": {"rate": RATE}})
        _, no_avatar = await probe.wait_for("bare/events", lambda p: b"nobody" in p, after=seen)
    finally:
        await bridge.stop()
    offline = await probe.status("bare/status", lambda s: s["state"] == "offline")
    return replayed, json.loads(no_avatar), online, offline


def test_the_last_will_says_offline_when_the_link_dies(broker):
    """The broker publishes the will when the bridge's connection ends without a goodbye (here another
    client takes its client id over); the bridge reconnects and says "online" again."""

    async def run():
        bridge = MqttBridge(SessionManager(None), AvatarStore(), MqttSettings("127.0.0.1", broker.port,
                                                                             prefix="will"))
        bridge.start()
        try:
            async with Probe(broker.port, "will/status") as probe:
                await probe.status("will/status", lambda s: s["state"] == "online")
                seen = len(probe.messages)
                async with Probe(broker.port, identifier=bridge.identifier):
                    will = await probe.status("will/status", lambda s: s["state"] == "offline", after=seen)
                back = await probe.status("will/status", lambda s: s["state"] == "online",
                                          after=len(probe.messages) - 1, timeout=15)
        finally:
            await bridge.stop()
        return will, back

    will, back = asyncio.run(run())
    assert will == {"state": "offline", "sessions": [], "max_sessions": 4}
    assert back["state"] == "online"


def test_mqtt_settings_are_checked():
    settings = MqttSettings.from_url("mqtts://broker.example.org", username="u", password="p", prefix="a/b")
    assert (settings.host, settings.port, settings.tls, settings.prefix) == ("broker.example.org", 8883, True, "a/b")
    assert MqttSettings.from_url("mqtt://127.0.0.1:1884").port == 1884
    for url in ("http://x", "mqtt://", "mqtt://u:p@x", "mqtt://x/topic", "mqtt://x:99999"):
        with pytest.raises(ValueError, match="MQTT broker"):
            MqttSettings.from_url(url)
    for bad in (dict(prefix="a/+"), dict(prefix="/a"), dict(prefix="a//b"), dict(password="p"),
                dict(ca="ca.pem"), dict(tls=True, ca="/nonexistent/ca.pem")):
        with pytest.raises(ValueError):
            MqttSettings("x", **bad)


def test_with_a_token_every_command_must_carry_it(broker):
    """A bridge over a server with a token and no default avatar: commands without the token, or with
    another one, are refused as such; with it, they reach the command itself (here: no avatar)."""

    async def run():
        bridge = MqttBridge(SessionManager(None), AvatarStore(), MqttSettings("127.0.0.1", broker.port,
                                                                             prefix="locked"), token="s3cret")
        bridge.start()
        try:
            async with Probe(broker.port, "locked/status", "locked/events") as probe:
                await probe.status("locked/status", lambda s: s["state"] == "online")
                replies = []
                for token in (None, "wrong", 7, "s3cret"):
                    seen = len(probe.messages)
                    command = create("guarded") | ({} if token is None else {"token": token})
                    await probe.publish("locked/control", command)
                    replies.append((await probe.event("locked/events", "error", after=seen))[1]["message"])
                seen = len(probe.messages)
                await probe.publish("locked/guarded/control", {"cmd": "interrupt"})
                replies.append((await probe.event("locked/events", "error", after=seen))[1]["message"])
        finally:
            await bridge.stop()
        return replies

    *refused, allowed, unknown = asyncio.run(run())
    assert all("access token" in message for message in refused), refused
    assert "no default one" in allowed, allowed
    assert "access token" in unknown, unknown
