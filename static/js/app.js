// The chat page: wires the store, settings, transport and views together.
import { loadConversations, newId, saveConversations } from "./store.js";
import { createSettings } from "./settings.js";
import { createTransport } from "./transport.js";
import { messageView, renderConversationList } from "./render.js";
import { createBeamView, restoreBeamView } from "./beam.js";

const page = JSON.parse(document.getElementById("page-config").textContent);
const $ = (id) => document.getElementById(id);
const ui = {
  layout: $("layout"), messages: $("messages"), empty: $("empty-state"), prompt: $("prompt"),
  composer: $("composer"), send: $("send"), stop: $("stop"), title: $("chat-title"),
  conversations: $("conversations"), newChat: $("new-chat"), settings: $("settings"),
  toggleSettings: $("toggle-settings"), closeSettings: $("close-settings"), toggleSidebar: $("toggle-sidebar"),
  statusDot: $("status-dot"), modelName: $("model-name"), transportName: $("transport-name"),
  scrim: $("scrim"), hint: $("composer-hint"), suggestions: $("suggestions"),
};
const PLAIN_HINT = ui.hint.textContent;

const settings = createSettings($("settings-form"), { max_tokens: page.defaultMaxTokens }, () => setBusy(transport.busy));
if (!page.needsApiKey) $("api-key-field").hidden = true;
const transport = createTransport({
  getApiKey: () => settings.values.api_key,
  onMode: (mode) => { ui.transportName.textContent = mode === "websocket" ? "WebSocket" : "SSE"; },
  forceSse: new URLSearchParams(location.search).get("transport") === "sse",
});

const state = { conversations: loadConversations(), currentId: null };

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

// ---- conversations ---------------------------------------------------------------------------
function persist() {
  saveConversations(state.conversations);
  renderConversationList(ui.conversations, state.conversations.filter((c) => c.messages.length), state.currentId,
                         { onOpen: openConversation, onDelete: deleteConversation });
}

function openConversation(id) {
  if (transport.busy) transport.stop();
  state.currentId = id;
  const conv = current();
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = conv.messages.length > 0;
  ui.title.textContent = conv.title;
  for (const msg of conv.messages) {
    const view = messageView(msg.role, msg.content);
    if (msg.stats) view.setStats(msg.stats);
    if (msg.beam) {
      const beam = restoreBeamView(msg.beam, { onPick: (i) => pickCandidate(beam, view, msg, i) });
      view.root.insertBefore(beam.root, view.body);
    }
    ui.messages.append(view.root);
  }
  showSidebar(false);
  persist();
  scrollToEnd(true);
}

function newConversation() {
  const fresh = state.conversations.find((c) => c.messages.length === 0);
  const conv = fresh || { id: newId(), title: "New chat", updated: Date.now(), messages: [] };
  if (!fresh) state.conversations.unshift(conv);
  openConversation(conv.id);
  ui.prompt.focus();
}

function deleteConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (id === state.currentId) newConversation();
  else persist();
}

// ---- a turn ----------------------------------------------------------------------------------
function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToEnd(force = false) {
  if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function idleHint() {
  const w = settings.beamWidth();
  return w > 1 ? `Beam search, width ${w}: watch the tree grow, then pick the candidate you prefer.` : PLAIN_HINT;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.hint.textContent = busy ? "Generating… press the stop button to abort." : idleHint();
}

function conversationForServer(conv) {
  const system = settings.values.system.trim();
  const turns = conv.messages.map(({ role, content }) => ({ role, content }));
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

async function send(text) {
  const conv = current();
  if (!text.trim() || transport.busy) return;
  conv.messages.push({ role: "user", content: text });
  if (conv.messages.length === 1) conv.title = text.trim().slice(0, 60);
  conv.updated = Date.now();
  state.conversations = [conv, ...state.conversations.filter((c) => c !== conv)];
  ui.title.textContent = conv.title;
  ui.empty.hidden = true;
  ui.messages.append(messageView("user", text).root);
  const view = messageView("assistant");
  view.setState("waiting");
  ui.messages.append(view.root);
  scrollToEnd(true);
  persist();
  setBusy(true);
  const params = settings.params();
  if (params.beam_width > 1) return sendBeam(conv, view, params);

  const started = performance.now();
  let firstAt = null;
  let tokens = 0;
  const finish = (info, ok) => {
    setBusy(false);
    if (!ok) return;
    view.setState("done");
    view.setStats(info);
    conv.messages.push({ role: "assistant", content: view.text(), stats: info });
    persist();
  };
  await transport.send(conversationForServer(conv), params, {
    onDelta(ev) {
      if (firstAt === null) { firstAt = performance.now(); view.setState("streaming"); }
      tokens += (ev.token_ids || []).length;
      view.append(ev.text);
      scrollToEnd();
    },
    onDone(ev) {
      const timing = ev.timing || {};
      const elapsed = (performance.now() - (firstAt ?? started)) / 1000;
      finish({
        ttft_s: timing.ttft_s ?? (firstAt === null ? undefined : (firstAt - started) / 1000),
        tokens_per_s: timing.tokens_per_s ?? (tokens > 1 && elapsed > 0 ? (tokens - 1) / elapsed : undefined),
        completion_tokens: ev.usage ? ev.usage.completion_tokens : tokens,
        finish_reason: ev.finish_reason,
      }, true);
    },
    onError(err) {
      view.setError(`Error: ${err.message || "something went wrong"}`);
      finish(null, false);
    },
  });
}

// ---- a beam search turn ------------------------------------------------------------------------
// The tree grows above the answer; the answer shows the best running beam, then the top candidate,
// then whichever candidate the user picks (which is what the conversation continues from).
async function sendBeam(conv, view, params) {
  let msg = null;
  const beam = createBeamView({ width: params.beam_width, onPick: (i) => pickCandidate(beam, view, msg, i) });
  view.root.insertBefore(beam.root, view.body);
  let stepped = false;
  const finish = (info) => {
    setBusy(false);
    view.setState("done");
    view.setStats(info);
  };
  await transport.send(conversationForServer(conv), params, {
    onDelta() {},
    onEvent(ev) {
      if (ev.type === "beam_step") {
        if (!stepped) { stepped = true; view.setState("streaming"); }
        beam.step(ev);
        view.setText(beam.bestText());
        scrollToEnd();
      } else if (ev.type === "beam_done") {
        beam.done(ev);
        const top = ev.candidates[0];
        view.setText(top ? top.text : "");
        const timing = ev.timing || {};
        const info = { ttft_s: timing.ttft_s, steps_per_s: timing.tokens_per_s, beam_width: params.beam_width,
                       steps: ev.usage ? ev.usage.completion_tokens : beam.steps, finish_reason: ev.finish_reason };
        finish(info);
        if (top) {
          msg = { role: "assistant", content: top.text, stats: info, beam: beam.snapshot() };
          conv.messages.push(msg);
          persist();
        }
        scrollToEnd();
      }
    },
    onDone(ev) {  // an SSE search stopped by this page before its beam_done arrived
      beam.stopped();
      finish({ finish_reason: ev.finish_reason, beam_width: params.beam_width, steps: beam.steps });
    },
    onError(err) {
      beam.stopped();
      view.setError(`Error: ${err.message || "something went wrong"}`);
      setBusy(false);
    },
  });
}

// Record the pick on the server, then make it the answer the conversation continues from.
async function pickCandidate(beam, view, msg, index) {
  const saved = beam.snapshot();
  if (!saved || !saved.record_id) return;
  try {
    await transport.postJson("/beam_choice", { record_id: saved.record_id, chosen: index });
  } catch (err) {
    beam.pickError(err.message);
    return;
  }
  beam.markChosen(index);
  const cand = beam.candidate(index);
  view.setText(cand.text);
  if (msg) {
    msg.content = cand.text;
    msg.beam = beam.snapshot();
    persist();
  }
}

// ---- status ------------------------------------------------------------------------------------
async function pollHealth() {
  try {
    const res = await fetch("/health", { cache: "no-store" });
    const body = await res.json();
    ui.statusDot.dataset.state = res.ok ? "ready" : body.status === "error" ? "error" : "loading";
    ui.modelName.textContent = res.ok ? `${body.model} · ${body.backend}` : body.status === "error"
      ? "model failed to load" : "loading the model…";
    if (res.ok) return;
  } catch {
    ui.statusDot.dataset.state = "error";
    ui.modelName.textContent = "server unreachable";
  }
  setTimeout(pollHealth, 2000);
}

// ---- events ------------------------------------------------------------------------------------
ui.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = ui.prompt.value;
  if (!text.trim() || transport.busy) return;
  ui.prompt.value = "";
  autosize();
  send(text);
});
ui.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    ui.composer.requestSubmit();
  }
});
function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}
ui.prompt.addEventListener("input", autosize);
ui.stop.addEventListener("click", () => transport.stop());
ui.newChat.addEventListener("click", newConversation);
// On small screens the sidebar and the settings slide over the chat, above a scrim.
function syncScrim() {
  ui.scrim.hidden = !ui.layout.classList.contains("sidebar-open") && ui.settings.hidden;
}
function showSidebar(show) {
  ui.layout.classList.toggle("sidebar-open", show);
  syncScrim();
}
function showSettings(show) {
  ui.settings.hidden = !show;
  ui.toggleSettings.setAttribute("aria-expanded", String(show));
  syncScrim();
}
ui.toggleSidebar.addEventListener("click", () => showSidebar(!ui.layout.classList.contains("sidebar-open")));
ui.scrim.addEventListener("click", () => { showSidebar(false); showSettings(false); });
for (const button of ui.suggestions.querySelectorAll(".suggestion")) {
  button.addEventListener("click", () => send(button.textContent));
}
ui.toggleSettings.addEventListener("click", () => showSettings(ui.settings.hidden));
ui.closeSettings.addEventListener("click", () => showSettings(false));

// ---- start -------------------------------------------------------------------------------------
if (state.conversations.length) openConversation(state.conversations[0].id);
else newConversation();
setBusy(false);
pollHealth();
