"use strict";
// Browser webcam filter: camera frames go to WS /ws as JPEGs, diffused JPEGs come back (docs/server.md).
// At most `max_in_flight` frames (from the server's hello) are unanswered at any time. The k-th frame sent has
// seq k; every frame is answered once: a `frame` event and its JPEG, a `dropped` event or an `error` with its seq.

const STALE_FRAME_MS = 15000;  // a frame unanswered this long is given up (only if the server broke the protocol)
const BLEND_SEND_MS = 150;  // while the blend slider moves, at most one prompt message per this many ms

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const canvas = document.createElement("canvas");

// Exposed for tests and the curious (e.g. window.streamdiff.framesReceived).
const state = window.streamdiff = {
  ws: null, hello: null, camera: null, running: true, capturing: false, nextSeq: 0, announced: null,
  inFlight: new Map(), framesReceived: 0, dropped: 0, outputTimes: [], reconnectDelay: 1000, outputUrl: null,
};

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function listCameras(selectedId) {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const select = $("camera");
  select.replaceChildren();
  devices.filter((d) => d.kind === "videoinput").forEach((device, index) => {
    const option = new Option(device.label || `camera ${index + 1}`, device.deviceId);
    option.selected = device.deviceId === selectedId;
    select.add(option);
  });
}

function cameraErrorMessage(error) {
  switch (error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Camera access was blocked. Allow the camera for this site (the camera icon in the address bar) and reload.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera was found. Connect one and reload.";
    case "NotReadableError":
      return "The camera is in use by another application.";
    default:
      return `The camera could not start: ${error.message || error.name}`;
  }
}

async function startCamera(deviceId) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showMessage("This browser gives no camera access here: open the page at http://localhost or over HTTPS.");
    return;
  }
  if (state.camera) state.camera.getTracks().forEach((track) => track.stop());
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({
      video: deviceId ? { deviceId: { exact: deviceId } } : { width: 640, height: 480 }, audio: false,
    });
  } catch (error) {
    state.camera = null;
    showMessage(cameraErrorMessage(error));
    setStatus("no camera");
    return;
  }
  $("camera-view").srcObject = state.camera;
  await $("camera-view").play().catch(() => {});
  await listCameras(state.camera.getVideoTracks()[0].getSettings().deviceId);
  if (!state.ws || state.ws.readyState === WebSocket.CLOSED) connect();
  pump();
}

function closeMessage(event) {
  const reason = event.reason ? ` (${event.reason})` : "";
  switch (event.code) {
    case 1008: return { text: `Access denied${reason}. Open the page with ?token=… .`, retry: false };
    case 1009: return { text: `A frame was too large for the server${reason}.`, retry: false };
    case 1013: return { text: `The server is full or still loading${reason}. Retrying…`, retry: true };
    // Idle: reconnect only once there is a camera to stream from (startCamera connects then).
    case 4408: return { text: `Closed while idle${reason}.`, retry: Boolean(state.camera) };
    default: return { text: `Disconnected (code ${event.code})${reason}. Reconnecting…`, retry: true };
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  const ws = new WebSocket(`${scheme}${location.host}/ws${query}`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  state.hello = null;
  state.inFlight = new Map();
  state.nextSeq = 0;
  state.announced = null;
  setStatus("connecting…");
  ws.onmessage = (event) => {
    if (typeof event.data === "string") handleEvent(JSON.parse(event.data));
    else handleFrame(event.data);
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    const { text, retry } = closeMessage(event);
    showMessage(text);
    setStatus("disconnected");
    if (retry) {
      setTimeout(connect, state.reconnectDelay);
      state.reconnectDelay = Math.min(state.reconnectDelay * 2, 10000);
    }
  };
}

function handleEvent(message) {
  if (message.type === "hello") {
    state.hello = message;
    state.reconnectDelay = 1000;
    showMessage("");
    setStatus(`streaming · session ${message.session_id} · ${message.width}×${message.height}`);
    $("controlnet").hidden = !message.controlnet;
    $("controlnet-name").textContent = message.controlnet ? `(${message.controlnet})` : "";
    if (message.controlnet) {
      // A new session starts from the server's defaults: carry this page's ControlNet settings over.
      sendParams({ controlnet_scale: Number($("controlnet-scale").value) / 100, show_control: $("show-control").checked });
    }
    const viewer = `${location.origin}/view/${message.session_id}`;
    // The link works (it carries the token) but never shows it: the page may be on a stream or a screenshot.
    $("viewer-link").href = token ? `${viewer}?token=${encodeURIComponent(token)}` : viewer;
    $("viewer-link").textContent = token ? `${viewer}?token=…` : viewer;
    pump();
  } else if (message.type === "frame") {
    state.announced = message;  // its JPEG is the next binary message
  } else if (message.type === "dropped") {
    state.inFlight.delete(message.seq);
    state.dropped += 1;
    $("dropped").textContent = String(state.dropped);
    pump();
  } else if (message.type === "error") {
    if (message.seq !== undefined && message.seq !== null) state.inFlight.delete(message.seq);
    showMessage(`Server: ${message.message}`);
    pump();
  }
}

function handleFrame(buffer) {
  const seq = state.announced ? state.announced.seq : undefined;
  state.announced = null;
  const sentAt = state.inFlight.get(seq);
  state.inFlight.delete(seq);
  const now = performance.now();
  state.framesReceived += 1;
  $("frames-received").textContent = String(state.framesReceived);
  if (sentAt !== undefined) $("latency").textContent = (now - sentAt).toFixed(0);
  state.outputTimes.push(now);
  while (state.outputTimes.length > 1 && now - state.outputTimes[0] > 2000) state.outputTimes.shift();
  if (state.outputTimes.length > 1) {
    const span = (now - state.outputTimes[0]) / 1000;
    $("fps").textContent = ((state.outputTimes.length - 1) / span).toFixed(1);
  }
  const url = URL.createObjectURL(new Blob([buffer], { type: "image/jpeg" }));
  $("output").src = url;
  if (state.outputUrl) URL.revokeObjectURL(state.outputUrl);
  state.outputUrl = url;
  pump();
}

function drawFrame(video, width, height) {
  // Centre-crop the camera to the engine's aspect ratio, scaled to the engine's size.
  const scale = Math.max(width / video.videoWidth, height / video.videoHeight);
  const cropW = width / scale, cropH = height / scale;
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage(video, (video.videoWidth - cropW) / 2, (video.videoHeight - cropH) / 2,
    cropW, cropH, 0, 0, width, height);
}

function pump() {
  const video = $("camera-view");
  const ws = state.ws;
  if (!state.running || state.capturing || !state.hello || !ws || ws.readyState !== WebSocket.OPEN) return;
  if (state.inFlight.size >= state.hello.max_in_flight || !video.videoWidth) return;
  state.capturing = true;
  drawFrame(video, state.hello.width, state.hello.height);
  canvas.toBlob(async (blob) => {
    try {
      if (blob && ws.readyState === WebSocket.OPEN && state.ws === ws) {
        ws.send(await blob.arrayBuffer());
        state.inFlight.set(state.nextSeq, performance.now());
        state.nextSeq += 1;
      }
    } finally {
      state.capturing = false;
    }
    pump();
  }, "image/jpeg", 0.85);
}

function promptMessage() {
  // One prompt, or a weighted blend of two when the second is filled in: the slider is the second one's weight.
  const first = $("prompt").value.trim();
  const second = $("prompt-2").value.trim();
  if (!first) return null;
  if (!second) return { type: "prompt", prompt: first };
  const weight = Number($("blend").value) / 100;
  return { type: "prompt", prompts: [[first, 1 - weight], [second, weight]] };
}

function sendPrompt() {
  const message = promptMessage();
  if (message && state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

$("prompt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sendPrompt();
});

// Moving the slider re-blends live (the server re-encodes nothing: each prompt's K/V is cached), throttled.
let blendTimer = null;
$("blend").addEventListener("input", () => {
  $("blend-value").textContent = `${$("blend").value}%`;
  if (!$("prompt-2").value.trim() || blendTimer !== null) return;
  blendTimer = setTimeout(() => {
    blendTimer = null;
    sendPrompt();
  }, BLEND_SEND_MS);
});

$("camera").addEventListener("change", (event) => startCamera(event.target.value));

function sendParams(params) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "params", ...params }));
}

let scaleTimer = null;
$("controlnet-scale").addEventListener("input", () => {
  const scale = Number($("controlnet-scale").value) / 100;
  $("controlnet-scale-value").textContent = scale.toFixed(2);
  if (scaleTimer !== null) return;
  scaleTimer = setTimeout(() => {
    scaleTimer = null;
    sendParams({ controlnet_scale: Number($("controlnet-scale").value) / 100 });
  }, BLEND_SEND_MS);
});

$("show-control").addEventListener("change", (event) => sendParams({ show_control: event.target.checked }));

$("temporal").addEventListener("change", (event) => {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "params", temporal: event.target.value }));
  }
});

$("toggle").addEventListener("click", () => {
  state.running = !state.running;
  $("toggle").textContent = state.running ? "Stop" : "Start";
  pump();
});

$("camera-view").addEventListener("playing", pump);

setInterval(() => {
  // Give up on frames that never came back so the stream cannot stall for good.
  const now = performance.now();
  for (const [seq, sentAt] of state.inFlight) if (now - sentAt > STALE_FRAME_MS) state.inFlight.delete(seq);
  pump();
}, 1000);

startCamera();
connect();
