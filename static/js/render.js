// DOM for messages. Model output is ALWAYS text: Text nodes and textContent; no string is ever
// parsed as HTML anywhere on this page (tests/test_webapp.py checks the JS for HTML sinks).

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function icon(pathData) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", pathData);
  svg.append(path);
  return svg;
}

const ROLE_LABEL = { user: "You", assistant: "Assistant" };

// One message bubble. append() grows a single Text node, so streaming is cheap and inert.
export function messageView(role, content = "") {
  const root = el("article", `msg ${role}`);
  root.append(el("div", "msg-role", ROLE_LABEL[role] || role));
  const body = el("div", "msg-body");
  const text = document.createTextNode(content);
  body.append(text);
  const stats = el("div", "msg-stats");
  root.append(body, stats);
  return {
    root,
    body,
    append(delta) { text.data += delta; },
    setText(value) { text.data = value; },
    text() { return text.data; },
    setState(state) {
      root.classList.toggle("waiting", state === "waiting");
      root.classList.toggle("streaming", state === "waiting" || state === "streaming");
      root.classList.toggle("error", state === "error");
    },
    setError(message) {
      text.data = message;
      this.setState("error");
    },
    setStats(info) { renderStats(stats, info); },
  };
}

function fmtSeconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

// Chips under an answer: time to first token, tokens/s, token count, and why it ended.
export function renderStats(container, info) {
  container.replaceChildren();
  if (!info) return;
  const chips = [];
  if (typeof info.ttft_s === "number") chips.push(["TTFT " + fmtSeconds(info.ttft_s), "Time to first token"]);
  if (typeof info.tokens_per_s === "number") chips.push([`${info.tokens_per_s.toFixed(1)} tok/s`, "Decode speed"]);
  if (typeof info.completion_tokens === "number") chips.push([`${info.completion_tokens} tokens`, "Tokens generated"]);
  if (typeof info.beam_width === "number") chips.push([`beam ${info.beam_width}`, "Beam width: candidates kept per step"]);
  if (typeof info.steps_per_s === "number") chips.push([`${info.steps_per_s.toFixed(1)} steps/s`, "Beam steps per second (each extends every beam by a token)"]);
  if (typeof info.steps === "number") chips.push([`${info.steps} steps`, "Beam search steps"]);
  if (info.finish_reason === "abort") chips.push(["stopped", "Stopped by you", "stopped"]);
  if (info.finish_reason === "length") chips.push(["max tokens", "Hit the max tokens limit"]);
  for (const [label, title, extra] of chips) {
    const chip = el("span", extra ? `chip ${extra}` : "chip", label);
    chip.title = title;
    container.append(chip);
  }
}

// The conversation list in the sidebar.
export function renderConversationList(nav, conversations, currentId, { onOpen, onDelete }) {
  nav.replaceChildren();
  for (const conv of conversations) {
    const item = el("div", "conv");
    item.setAttribute("role", "button");
    item.tabIndex = 0;
    item.dataset.id = conv.id;
    if (conv.id === currentId) item.setAttribute("aria-current", "true");
    item.append(el("span", "conv-title", conv.title));
    const del = el("button", "conv-delete");
    del.type = "button";
    del.setAttribute("aria-label", "Delete conversation");
    del.append(icon("M6 6l12 12M18 6L6 18"));
    del.addEventListener("click", (ev) => { ev.stopPropagation(); onDelete(conv.id); });
    item.append(del);
    item.addEventListener("click", () => onOpen(conv.id));
    item.addEventListener("keydown", (ev) => { if (ev.key === "Enter") onOpen(conv.id); });
    nav.append(item);
  }
}
