// lipstream page: pick devices and a mode, send an offer to POST /offer, show the face that comes back
// and the server's stats (the "stats" data channel). No build step; window.lipstream is for tests.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { pc: null, local: null, stats: null, session: null, error: null };
window.lipstream = state;

// The server's access token (serve --token), asked for once when the server first answers 401 and
// kept in this browser; every API call sends it. Several calls refused at once share one question.
const TOKEN_KEY = "lipstream-token";
let tokenAsked = null;

function askForToken() {
  tokenAsked = tokenAsked || Promise.resolve().then(() => {
    const given = window.prompt("This lipstream server needs its access token:");
    if (given) localStorage.setItem(TOKEN_KEY, given.trim());
  });
  return tokenAsked;
}

async function api(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(init.headers || {});
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const reply = await fetch(path, { ...init, headers });
    if (reply.status !== 401 || attempt > 0) return reply;
    await askForToken();
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  if (isError) state.error = text;
}

async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [kind, select] of [["audioinput", $("microphone")], ["videoinput", $("camera")]]) {
    const chosen = select.value;
    select.replaceChildren(...devices.filter((d) => d.kind === kind).map((d, i) =>
      new Option(d.label || `${kind} ${i + 1}`, d.deviceId, false, d.deviceId === chosen)));
  }
}

async function listAvatars(select) {
  const avatars = await (await api("/avatars")).json();
  $("avatar").replaceChildren(...avatars.map((a) =>
    new Option(`${a.name} (${a.width}x${a.height}, ${a.frames} frame${a.frames > 1 ? "s" : ""})`, a.avatar)));
  if (select) $("avatar").value = select;
}

async function listSessions() {
  const { sessions } = await (await api("/sessions")).json();
  $("session").replaceChildren(...Object.values(sessions).map((s) =>
    new Option(`${s.session} (${s.kind}, ${s.viewers} watching)`, s.session)));
}

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  setStatus(`checking ${file.name}...`);
  const reply = await api("/avatar", { method: "POST", body: form });
  const body = await reply.json();
  if (!reply.ok) return setStatus(body.error, true);
  await listAvatars(body.avatar);
  document.querySelector("input[value=avatar]").checked = true;
  setStatus(`avatar ${file.name} ready`);
}

function waitForIceGathering(pc, timeoutMs = 5000) {
  // aiortc does not trickle: the offer goes out with every candidate in it.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function connect() {
  const mode = document.querySelector("input[name=mode]:checked").value;
  $("connect").disabled = true;
  setStatus("connecting...");
  try {
    const { iceServers } = await (await api("/ice")).json();
    const pc = new RTCPeerConnection({ iceServers });
    state.pc = pc;
    if (mode === "viewer") {  // watch only: nothing of ours is sent
      if (!$("session").value) throw new Error("no session to watch: pick one (Refresh)");
      pc.addTransceiver("video", { direction: "recvonly" });
      pc.addTransceiver("audio", { direction: "recvonly" });
    } else {
      state.local = await navigator.mediaDevices.getUserMedia({
        audio: { deviceId: $("microphone").value || undefined },
        video: mode === "camera" ? { deviceId: $("camera").value || undefined, frameRate: 25 } : false,
      });
      await listDevices();  // labels are only known once access is granted
      state.local.getTracks().forEach((track) => pc.addTrack(track, state.local));
      if (mode === "avatar") pc.addTransceiver("video", { direction: "recvonly" });
    }
    pc.ontrack = (event) => {
      const video = $("remote");
      if (!video.srcObject) video.srcObject = event.streams[0] || new MediaStream();
      if (!event.streams[0]) video.srcObject.addTrack(event.track);
    };
    pc.onconnectionstatechange = () => {
      setStatus(pc.connectionState, pc.connectionState === "failed");
      if (["failed", "closed"].includes(pc.connectionState)) disconnect();
    };
    const channel = pc.createDataChannel("stats");
    channel.onmessage = (event) => showStats(JSON.parse(event.data));

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    const reply = await api("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, mode,
                             avatar: mode === "avatar" ? $("avatar").value : undefined,
                             session: mode === "viewer" ? $("session").value : undefined }),
    });
    const answer = await reply.json();
    if (!reply.ok) throw new Error(answer.error);
    state.session = answer.session;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    await keepResolution(pc);
    $("disconnect").disabled = false;
  } catch (error) {
    disconnect();
    setStatus(String(error.message || error), true);
  }
}

async function keepResolution(pc) {
  // The face crop needs the pixels: under load, drop camera frames rather than resolution (the
  // server holds the newest picture for each of its own 25 fps ticks anyway).
  const sender = pc.getSenders().find((s) => s.track && s.track.kind === "video");
  if (!sender) return;
  const parameters = sender.getParameters();
  parameters.degradationPreference = "maintain-resolution";
  await sender.setParameters(parameters).catch(() => {});
}

function disconnect() {
  if (state.pc) state.pc.close();
  if (state.local) state.local.getTracks().forEach((track) => track.stop());
  state.pc = state.local = null;
  $("remote").srcObject = null;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  if (!state.error) setStatus("idle");
}

function showStats(stats) {
  state.stats = stats;
  const ms = (v) => (v == null ? "-" : Math.round(v));
  $("fps").textContent = stats.fps == null ? "-" : stats.fps.toFixed(1);
  $("latency").textContent = stats.latency_ms ? `${ms(stats.latency_ms.p50)} / ${ms(stats.latency_ms.p95)}` : "-";
  $("av-offset").textContent = ms(stats.av_offset_ms);
  $("frames").textContent = `${stats.frames_out} / ${stats.frames_generated} / ${stats.dropped_frames}`;
}

async function showReceivedRate() {
  if (!state.pc) return;
  for (const report of (await state.pc.getStats()).values()) {
    if (report.type === "inbound-rtp" && report.kind === "video" && report.framesPerSecond != null) {
      $("received-fps").textContent = report.framesPerSecond.toFixed(1);
    }
  }
}

$("connect").onclick = () => { state.error = null; connect(); };
$("disconnect").onclick = disconnect;
$("upload").onchange = upload;
$("refresh-sessions").onclick = listSessions;
window.addEventListener("pagehide", disconnect);
navigator.mediaDevices.addEventListener("devicechange", listDevices);
setInterval(showReceivedRate, 1000);
listDevices();
listAvatars();
listSessions();
