// The settings drawer: a form bound to the saved settings.
import { DEFAULT_SETTINGS, loadSettings, saveSettings } from "./store.js";

const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "max_tokens"];

export function createSettings(form, defaults) {
  let settings = loadSettings(defaults);

  function fill() {
    for (const [name, value] of Object.entries(settings)) {
      const input = form.elements.namedItem(name);
      if (input) input.value = value;
    }
    for (const out of form.querySelectorAll("output[data-for]")) {
      out.textContent = Number(settings[out.dataset.for]).toFixed(2);
    }
  }

  function read() {
    const next = { ...settings };
    for (const name of Object.keys(DEFAULT_SETTINGS)) {
      const input = form.elements.namedItem(name);
      if (!input) continue;
      next[name] = NUMBER_FIELDS.includes(name) ? Number(input.value) : input.value;
    }
    return next;
  }

  form.addEventListener("input", () => { settings = read(); saveSettings(settings); fill(); });
  form.addEventListener("submit", (ev) => ev.preventDefault());
  form.querySelector("#reset-settings").addEventListener("click", () => {
    settings = { ...DEFAULT_SETTINGS, ...defaults, api_key: settings.api_key };
    saveSettings(settings);
    fill();
  });
  fill();

  return {
    get values() { return settings; },
    // The sampling fields the server takes (same names as the JSON API).
    params() {
      const p = { temperature: settings.temperature, top_p: settings.top_p, top_k: Math.round(settings.top_k),
                  max_tokens: Math.max(1, Math.round(settings.max_tokens)) };
      for (const k of Object.keys(p)) if (!Number.isFinite(p[k])) delete p[k];
      return p;
    },
  };
}
