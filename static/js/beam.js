// The beam search view inside an answer: a live tree (inline SVG) of every candidate the search
// weighed, then the finished candidates in reranked order with a button to pick one. Model text
// only ever goes into textContent; elements come from createElement/createElementNS.
//
// Events (webapp/beam_schema.py): {type: "beam_step", nodes: [{id, parent, token_id, text,
// logprob, score, status, step}], dropped: [ids]} per step; {type: "beam_done", candidates, tree,
// record_id, reranked, finish_reason, ...} last. The final step's nodes arrive only in `tree`.

const SVG_NS = "http://www.w3.org/2000/svg";
const COL_W = 100;      // one search step per column
const ROW_H = 30;       // one candidate per row within its step
const NODE_W = 72;
const NODE_H = 22;
const PAD = 12;
const LABEL_CHARS = 9;
const MAX_SAVED_NODES = 2500;  // larger trees are not kept in localStorage (the candidates are)

function el(tag, className, text) {
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

const fmt = (x, digits = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "—");
const signed = (x, digits = 3) => (typeof x === "number" && x >= 0 ? "+" : "") + fmt(x, digits);

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

// ---- the tree -------------------------------------------------------------------------------------
function createTree(root) {
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

// ---- the candidates ---------------------------------------------------------------------------
function candidateItem(cand, rank, { reranked, onPick, onHover }) {
  const li = el("li", "cand");
  const head = el("div", "cand-head");
  head.append(el("span", "cand-rank", `#${rank + 1}`));
  const chips = el("span", "cand-chips");
  const chip = (text, title, extra) => {
    const c = el("span", extra ? `chip ${extra}` : "chip", text);
    c.title = title;
    chips.append(c);
  };
  if (reranked && typeof cand.rerank_score === "number") chip(`rerank ${signed(cand.rerank_score, 2)}`, "Reranker score (higher is better)", "accent");
  chip(`LM ${fmt(cand.score ?? cand.lm_score, 3)}`, "Length-normalized log-probability from the beam search");
  if (typeof cand.num_tokens === "number") chip(`${cand.num_tokens} tok`, "Tokens in this candidate");
  if (reranked && cand.index !== rank) chip(`LM #${cand.index + 1}`, "Its place by LM score alone");
  head.append(chips);
  const pick = el("button", "btn btn-ghost cand-pick", "Use this");
  pick.type = "button";
  pick.addEventListener("click", () => onPick(rank));
  head.append(pick);
  li.append(head, el("div", "cand-text", cand.text || "(empty)"));
  const features = Object.entries(cand.features || {});
  if (features.length) {
    const details = el("details", "cand-features");
    details.append(el("summary", "", "features"));
    const dl = el("dl");
    for (const [name, value] of features) dl.append(el("dt", "", name), el("dd", "", fmt(value, 4)));
    details.append(dl);
    li.append(details);
  }
  li.addEventListener("mouseenter", () => onHover(rank));
  li.addEventListener("mouseleave", () => onHover(null));
  return { li, pick };
}

// ---- the view -----------------------------------------------------------------------------------
// One beam search answer. onPick(index) is called when the user picks a candidate.
export function createBeamView({ width, onPick }) {
  const root = el("section", "beam");
  const head = el("div", "beam-head");
  const title = el("span", "beam-title", `Beam search · width ${width}`);
  const status = el("span", "beam-status", "starting…");
  const fit = el("button", "btn btn-ghost beam-fit", "Fit");
  fit.type = "button";
  fit.title = "Fit the whole tree in view, or back to actual size";
  head.append(title, status, fit);
  const legend = el("div", "beam-legend");
  for (const [cls, text] of [["kept", "kept"], ["pruned", "pruned"], ["finished", "finished"], ["dropped", "dead end"]]) {
    const item = el("span", `lg ${cls}`);
    item.append(el("i"), document.createTextNode(text));
    legend.append(item);
  }
  const scroller = el("div", "beam-scroll");
  const tree = createTree(root);
  scroller.append(tree.svg);
  const cands = el("ol", "beam-cands");
  const note = el("p", "beam-note");
  note.hidden = true;
  root.append(head, legend, scroller, tree.tip, cands, note);
  tree.add([{ id: 0, parent: null, token_id: null, text: "", logprob: 0, score: 0, status: "kept", step: 0 }]);

  let follow = true;          // keep the newest step in view until the user scrolls away
  let fitted = false;
  let result = null;          // the beam_done event
  let chosen = null;
  let items = [];
  let steps = 0;

  scroller.addEventListener("scroll", () => {
    follow = scroller.scrollLeft + scroller.clientWidth >= scroller.scrollWidth - 40;
  });
  function layout() {
    // Sizes go through CSSOM (allowed by the page's CSP), over the stylesheet's icon-sized svg rule.
    tree.svg.style.width = fitted ? "100%" : `${tree.width}px`;
    tree.svg.style.height = fitted ? "auto" : `${tree.height}px`;
    fit.textContent = fitted ? "Actual size" : "Fit";
    if (!fitted && follow) scroller.scrollLeft = scroller.scrollWidth;
  }
  fit.addEventListener("click", () => { fitted = !fitted; layout(); });

  function highlight(rank) {
    if (!result) return;
    const leaves = rank === null ? result.candidates.map((c) => c.node_id) : [result.candidates[rank].node_id];
    tree.paths(leaves, chosen === null ? null : result.candidates[chosen].node_id);
  }

  function showCandidates() {
    cands.replaceChildren();
    items = result.candidates.map((cand, rank) => {
      const item = candidateItem(cand, rank, { reranked: result.reranked, onPick: (i) => onPick(i),
                                              onHover: highlight });
      if (!result.record_id) item.pick.hidden = true;
      cands.append(item.li);
      return item;
    });
    result.candidates.forEach((c, rank) => tree.badge(c.node_id, `#${rank + 1}`));
    markChosen(chosen);
  }

  function markChosen(index) {
    chosen = index;
    items.forEach((item, i) => {
      item.li.classList.toggle("chosen", i === index);
      item.pick.textContent = i === index ? "Chosen ✓" : "Use this";
      item.pick.disabled = i === index;
    });
    highlight(null);
  }

  return {
    root,
    get steps() { return steps; },
    step(ev) {
      steps += 1;
      tree.add(ev.nodes || []);
      tree.drop(ev.dropped || []);
      status.textContent = `step ${steps} · ${tree.nodes.size - 1} candidates weighed`;
      layout();
    },
    // The search ended: merge the whole tree (statuses may have changed), list the candidates.
    done(ev) {
      result = ev;
      tree.add(ev.tree || []);
      for (const n of ev.tree || []) tree.setStatus(n);
      const reason = ev.finish_reason === "abort" ? "stopped" : ev.finish_reason === "length" ? "hit max tokens" : "done";
      status.textContent = `${reason} · ${tree.nodes.size - 1} candidates weighed · ${ev.candidates.length} finished`;
      root.classList.add("finished");
      if (ev.candidates.length) showCandidates();
      if (!ev.record_id && ev.candidates.length) {
        note.hidden = false;
        note.textContent = ev.finish_reason === "abort" ? "Stopped: these are the beams that had finished."
          : "This search was not recorded, so a pick cannot be saved.";
      } else if (ev.record_id && !ev.reranked) {
        note.hidden = false;
        note.textContent = "Not reranked: candidates are in LM-score order.";
      }
      layout();
    },
    stopped() {
      status.textContent = `stopped · ${tree.nodes.size - 1} candidates weighed`;
      root.classList.add("finished");
    },
    bestText: () => tree.bestText(),
    candidate: (i) => (result ? result.candidates[i] : null),
    markChosen,
    pickError(message) {
      note.hidden = false;
      note.textContent = `Could not record the choice: ${message}`;
    },
    // A compact copy for localStorage; restoreBeamView() rebuilds the view from it.
    snapshot() {
      if (!result) return null;
      const tree = result.tree.length <= MAX_SAVED_NODES
        ? result.tree.map((n) => [n.id, n.parent, n.token_id, n.text, +Number(n.logprob).toFixed(4),
                                  +Number(n.score).toFixed(4), n.status, n.step])
        : null;
      const candidates = result.candidates.map(({ text, score, lm_score, rerank_score, num_tokens, node_id, index,
                                                  features }) =>
        ({ text, score, lm_score, rerank_score, num_tokens, node_id, index, features }));
      return { width, record_id: result.record_id, reranked: result.reranked, finish_reason: result.finish_reason,
               chosen, candidates, tree };
    },
  };
}

// A saved beam answer (from snapshot()) shown again after a reload.
export function restoreBeamView(saved, { onPick }) {
  const view = createBeamView({ width: saved.width, onPick });
  const tree = (saved.tree || []).map(([id, parent, token_id, text, logprob, score, status, step]) =>
    ({ id, parent, token_id, text, logprob, score, status, step }));
  view.done({ type: "beam_done", candidates: saved.candidates, tree, record_id: saved.record_id,
              reranked: saved.reranked, finish_reason: saved.finish_reason });
  if (typeof saved.chosen === "number") view.markChosen(saved.chosen);
  return view;
}
