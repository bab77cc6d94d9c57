// The settings drawer: a form bound to the saved settings.
import { DEFAULT_SETTINGS, loadSettings, saveSettings } from "./store.js";

const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "beam_width", "beam_max_tokens", "length_penalty"];
const CHECK_FIELDS = ["early_stopping", "rerank"];

export function createSettings(form, defaults, onChange = () => {}) {
  let settings = loadSettings(defaults);

  function fill() {
    for (const [name, value] of Object.entries(settings)) {
      const input = form.elements.namedItem(name);
      if (!input) continue;
      if (CHECK_FIELDS.includes(name)) input.checked = Boolean(value);
      else input.value = value;
    }
    for (const out of form.querySelectorAll("output[data-for]")) {
      out.textContent = Number(settings[out.dataset.for]).toFixed(Number(out.dataset.digits ?? 2));
    }
    form.classList.toggle("beam-on", beamWidth() > 1);
  }

  function read() {
    const next = { ...settings };
    for (const name of Object.keys(DEFAULT_SETTINGS)) {
      const input = form.elements.namedItem(name);
      if (!input) continue;
      next[name] = CHECK_FIELDS.includes(name) ? input.checked : NUMBER_FIELDS.includes(name) ? Number(input.value) : input.value;
    }
    return next;
  }

  function beamWidth() {
    const w = Math.round(Number(settings.beam_width));
    return Number.isFinite(w) ? Math.min(16, Math.max(1, w)) : 1;
  }

  form.addEventListener("input", () => { settings = read(); saveSettings(settings); fill(); onChange(); });
  form.addEventListener("submit", (ev) => ev.preventDefault());
  form.querySelector("#reset-settings").addEventListener("click", () => {
    settings = { ...DEFAULT_SETTINGS, ...defaults, api_key: settings.api_key };
    saveSettings(settings);
    fill();
    onChange();
  });
  fill();

  return {
    get values() { return settings; },
    beamWidth,
    // The fields the server takes (same names as the JSON API): sampling, or beam search when width > 1.
    params() {
      if (beamWidth() > 1) {
        const p = { beam_width: beamWidth(), max_tokens: Math.max(1, Math.round(settings.beam_max_tokens)),
                    length_penalty: settings.length_penalty, early_stopping: Boolean(settings.early_stopping),
                    rerank: Boolean(settings.rerank) };
        for (const k of ["max_tokens", "length_penalty"]) if (!Number.isFinite(p[k])) delete p[k];
        return p;
      }
      const p = { temperature: settings.temperature, top_p: settings.top_p, top_k: Math.round(settings.top_k),
                  max_tokens: Math.max(1, Math.round(settings.max_tokens)) };
      for (const k of Object.keys(p)) if (!Number.isFinite(p[k])) delete p[k];
      return p;
    },
  };
}
