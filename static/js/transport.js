// How a chat turn reaches the server: a WebSocket (/ws/chat) first, Server-Sent Events over
// fetch (POST /stream) when the socket cannot open. Both deliver the same JSON events:
// {type: "delta", text, token_ids}, then {type: "done", finish_reason, usage, timing},
// or {type: "error", error: {message}}. A beam search (params.beam_width > 1) sends
// {type: "beam_step"}* then {type: "beam_done"} instead (POST /stream_chat_beam over SSE); those go
// to handlers.onEvent, and beam_done ends the turn.

const WS_OPEN_TIMEOUT_MS = 4000;

export function createTransport({ getApiKey, onMode, forceSse = false }) {
  let mode = forceSse ? "sse" : "websocket";
  let ws = null;
  let opening = null;
  let current = null;       // handlers of the running turn
  let controller = null;    // the running SSE fetch

  onMode(mode);

  function dispatch(event) {
    const handlers = current;
    if (!handlers) return;
    if (event.type === "delta") handlers.onDelta(event);
    else if (event.type === "done") { current = null; handlers.onDone(event); }
    else if (event.type === "error") { current = null; handlers.onError(event.error || { message: "error" }); }
    else if (event.type === "beam_done") { current = null; if (handlers.onEvent) handlers.onEvent(event); }
    else if (handlers.onEvent) handlers.onEvent(event);
  }

  function wsUrl() {
    const url = new URL("/ws/chat", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const key = getApiKey();
    if (key) url.searchParams.set("api_key", key);  // browsers cannot set headers on a WebSocket
    return url.toString();
  }

  function openSocket() {
    if (ws && ws.readyState === WebSocket.OPEN) return Promise.resolve(ws);
    if (opening) return opening;
    opening = new Promise((resolve, reject) => {
      const sock = new WebSocket(wsUrl());
      const timer = setTimeout(() => { sock.close(); reject(new Error("timeout")); }, WS_OPEN_TIMEOUT_MS);
      sock.onopen = () => { clearTimeout(timer); ws = sock; resolve(sock); };
      sock.onerror = () => { clearTimeout(timer); reject(new Error("websocket error")); };
      sock.onmessage = (msg) => {
        try { dispatch(JSON.parse(msg.data)); } catch (err) { console.error("bad frame", err); }
      };
      sock.onclose = () => {
        if (ws === sock) ws = null;
        if (current) dispatch({ type: "error", error: { message: "the connection closed mid-answer" } });
      };
    }).finally(() => { opening = null; });
    return opening;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = getApiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function sendSse(body, handlers) {
    controller = new AbortController();
    const path = body.beam_width > 1 ? "/stream_chat_beam" : "/stream";
    let response;
    try {
      response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    } catch (err) {
      controller = null;
      if (err.name === "AbortError") return dispatch({ type: "done", finish_reason: "abort" });
      return dispatch({ type: "error", error: { message: `network error: ${err.message}` } });
    }
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      controller = null;
      return dispatch({ type: "error", error: (data && data.error) || { message: `HTTP ${response.status}` } });
    }
    await readEvents(response.body, dispatch).catch((err) => {
      if (err.name === "AbortError") dispatch({ type: "done", finish_reason: "abort" });
      else dispatch({ type: "error", error: { message: `stream broke: ${err.message}` } });
    });
    controller = null;
    if (current === handlers) dispatch({ type: "error", error: { message: "the stream ended early" } });
  }

  return {
    get mode() { return mode; },
    get busy() { return current !== null; },

    // Start one turn: messages is the whole conversation, params the sampling settings.
    async send(messages, params, handlers) {
      current = handlers;
      if (mode === "websocket") {
        try {
          const sock = await openSocket();
          sock.send(JSON.stringify({ type: "chat", messages, params }));
          return;
        } catch {
          mode = "sse";  // no WebSocket here (proxy, policy): SSE from now on
          onMode(mode);
        }
      }
      await sendSse({ messages, ...params }, handlers);
    },

    // POST a JSON body (such as /beam_choice); resolves to the JSON answer, rejects with its error.
    async postJson(path, body) {
      const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
      return data;
    },

    // Abort the running turn; the server finishes it with finish_reason "abort".
    stop() {
      if (!current) return;
      if (mode === "websocket" && ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "stop" }));
      else if (controller) controller.abort();
    },
  };
}

// Parse a text/event-stream body: `data:` lines, events split by a blank line, `:` comments.
async function readEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}
