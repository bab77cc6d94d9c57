// The beam tree as inline SVG: a layered layout (x = search step, y = order within the step),
// edges from parent to child, a class per status (kept, pruned, finished; dropped = dead end), a
// hover/focus tooltip. Token text goes into textContent only; elements come from createElementNS.

const SVG_NS = "http://www.w3.org/2000/svg";
const COL_W = 100;      // one search step per column
const ROW_H = 30;       // one candidate per row within its step
const NODE_W = 72;
const NODE_H = 22;
const PAD = 12;
const LABEL_CHARS = 9;

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

export const fmt = (x, digits = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "—");

// What a token looks like in a node: leading space dropped, whitespace made visible, kept short.
export function tokenLabel(text) {
  if (text === "") return "∅";
  let s = text.replace(/\n/g, "↵").replace(/\t/g, "⇥");
  if (s.trim() === "") return "␣".repeat(Math.min(s.length, 3));
  s = s.replace(/^ /, "");
  return s.length > LABEL_CHARS ? s.slice(0, LABEL_CHARS - 1) + "…" : s;
}

function tipLines(n, dead) {
  if (n.parent === null) return ["the prompt", "every beam starts here"];
  return [`token ${JSON.stringify(n.text)}  (id ${n.token_id})`, `logprob ${fmt(n.logprob, 4)}`,
          `cumulative score ${fmt(n.score, 4)}`,
          `step ${n.step} · ${dead ? "kept, then a dead end" : n.status}`];
}

// root: the element the tooltip is positioned in.
export function createTree(root) {
  const nodes = new Map();      // id -> {data, row, x, y, g, rect, edge}
  const rows = new Map();       // step -> number of rows used
  const dropped = new Set();
  const svgRoot = svg("svg", { class: "beam-tree", role: "img", "aria-label": "Beam search tree" });
  const edges = svg("g", { class: "edges" });
  const layer = svg("g", { class: "nodes" });
  svgRoot.append(edges, layer);
  const tip = el("div", "beam-tip");
  tip.hidden = true;
  let width = 0;
  let height = 0;

  function showTip(entry) {
    tip.replaceChildren(...tipLines(entry.data, dropped.has(entry.data.id)).map((line) => el("div", "", line)));
    const box = entry.g.getBoundingClientRect();
    const host = root.getBoundingClientRect();
    tip.hidden = false;
    const left = Math.min(box.left - host.left, host.width - tip.offsetWidth - 4);
    tip.style.left = `${Math.max(4, left)}px`;
    tip.style.top = `${box.bottom - host.top + 6}px`;
  }

  function classes(entry) {
    const n = entry.data;
    const names = ["bn", n.status];
    if (n.parent === null) names.push("root");
    if (dropped.has(n.id)) names.push("dropped");
    if (entry.path) names.push(entry.path);
    entry.g.setAttribute("class", names.join(" "));
    if (entry.edge) entry.edge.setAttribute("class", ["edge", n.status, dropped.has(n.id) ? "dropped" : "",
                                                      entry.path || ""].join(" ").trim());
  }

  function place(n, row) {
    const x = PAD + n.step * COL_W;
    const y = PAD + row * ROW_H;
    const g = svg("g", { transform: `translate(${x},${y})`, tabindex: "0" });
    const title = svg("title");
    title.textContent = tipLines(n, false).join("\n");
    const rect = svg("rect", { width: NODE_W, height: NODE_H, rx: 6 });
    const label = svg("text", { x: NODE_W / 2, y: NODE_H / 2 + 4, "text-anchor": "middle" });
    label.textContent = n.parent === null ? "prompt" : tokenLabel(n.text);
    g.append(title, rect, label);
    const entry = { data: n, row, x, y, g, rect, title, edge: null, path: "" };
    const parent = nodes.get(n.parent);
    if (parent) {
      const x1 = parent.x + NODE_W, y1 = parent.y + NODE_H / 2, x2 = x, y2 = y + NODE_H / 2;
      const mid = (x1 + x2) / 2;
      entry.edge = svg("path", { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}` });
      edges.append(entry.edge);
    }
    g.addEventListener("mouseenter", () => showTip(entry));
    g.addEventListener("focus", () => showTip(entry));
    g.addEventListener("mouseleave", () => { tip.hidden = true; });
    g.addEventListener("blur", () => { tip.hidden = true; });
    layer.append(g);
    nodes.set(n.id, entry);
    classes(entry);
    width = Math.max(width, x + NODE_W + PAD + 28);
    height = Math.max(height, y + NODE_H + PAD);
  }

  // Lay out new nodes step by step: within a step, children sit in their parents' order, best first.
  function add(list) {
    const fresh = list.filter((n) => !nodes.has(n.id)).sort((a, b) => a.step - b.step);
    const bySteps = new Map();
    for (const n of fresh) {
      if (!bySteps.has(n.step)) bySteps.set(n.step, []);
      bySteps.get(n.step).push(n);
    }
    for (const [step, group] of bySteps) {
      const parentRow = (n) => (nodes.has(n.parent) ? nodes.get(n.parent).row : -1);
      group.sort((a, b) => parentRow(a) - parentRow(b) || b.score - a.score);
      let row = rows.get(step) || 0;
      for (const n of group) place(n, row++);
      rows.set(step, row);
    }
    svgRoot.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svgRoot.setAttribute("width", width);
    svgRoot.setAttribute("height", height);
    return fresh.length;
  }

  return {
    svg: svgRoot, tip, nodes,
    get width() { return width; },
    get height() { return height; },
    add,
    drop(ids) {
      for (const id of ids) {
        dropped.add(id);
        if (nodes.has(id)) classes(nodes.get(id));
      }
    },
    setStatus(n) {
      const entry = nodes.get(n.id);
      if (!entry || entry.data.status === n.status) return;
      entry.data = n;
      entry.title.textContent = tipLines(n, dropped.has(n.id)).join("\n");
      classes(entry);
    },
    // Mark the paths from the root to these leaves ("onpath"), one of them "chosen".
    paths(leafIds, chosenId) {
      for (const entry of nodes.values()) entry.path = "";
      const walk = (id, name) => {
        for (let e = nodes.get(id); e; e = nodes.get(e.data.parent)) if (e.path !== "chosen") e.path = name;
      };
      for (const id of leafIds) walk(id, "onpath");
      if (chosenId !== null && chosenId !== undefined) walk(chosenId, "chosen");
      for (const entry of nodes.values()) classes(entry);
    },
    badge(id, text) {
      const entry = nodes.get(id);
      if (!entry) return;
      const t = svg("text", { class: "badge", x: NODE_W + 4, y: NODE_H / 2 + 4 });
      t.textContent = text;
      entry.g.append(t);
    },
    // The text of the best running beam: the path to the best kept node of the newest step.
    bestText() {
      let best = null;
      for (const e of nodes.values()) {
        const n = e.data;
        if (n.status !== "kept" || n.parent === null) continue;
        if (!best || n.step > best.step || (n.step === best.step && n.score > best.score)) best = n;
      }
      const parts = [];
      for (let e = best && nodes.get(best.id); e && e.data.parent !== null; e = nodes.get(e.data.parent)) {
        parts.push(e.data.text);
      }
      return parts.reverse().join("").trimStart();
    },
  };
}

