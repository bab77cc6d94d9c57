// Conversations and settings in localStorage. Nothing here touches the DOM.
const CONVERSATIONS_KEY = "pagedecode.conversations.v1";
const SETTINGS_KEY = "pagedecode.settings.v1";
const MAX_CONVERSATIONS = 100;

export const DEFAULT_SETTINGS = Object.freeze({
  system: "", temperature: 0.7, top_p: 0.95, top_k: 0, max_tokens: 256, api_key: "",
  beam_width: 1, beam_max_tokens: 32, length_penalty: 1.0, early_stopping: true, rerank: true,
});

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;  // corrupt or blocked storage: start fresh rather than fail
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (err) {
    console.warn("pagedecode: could not save to localStorage", err);
  }
}

export function newId() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
}

function isMessage(m) {
  return m && typeof m === "object" && ["user", "assistant"].includes(m.role) && typeof m.content === "string";
}

// Conversations, newest first: [{id, title, updated, messages: [{role, content, stats?, beam?}]}]
// (beam: a beam search answer's snapshot from beam.js: candidates, tree, record_id, chosen).
export function loadConversations() {
  const list = read(CONVERSATIONS_KEY, []);
  if (!Array.isArray(list)) return [];
  return list
    .filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
    .map((c) => ({ ...c, title: String(c.title || "New chat"), messages: c.messages.filter(isMessage) }));
}

export function saveConversations(list) {
  const kept = list.filter((c) => c.messages.length > 0).slice(0, MAX_CONVERSATIONS);
  write(CONVERSATIONS_KEY, kept);
}

export function loadSettings(defaults = {}) {
  const saved = read(SETTINGS_KEY, {});
  const base = { ...DEFAULT_SETTINGS, ...defaults };
  return saved && typeof saved === "object" ? { ...base, ...saved } : base;
}

export function saveSettings(settings) {
  write(SETTINGS_KEY, settings);
}
