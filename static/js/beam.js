// The beam search view inside an answer: a live tree (inline SVG) of every candidate the search
// weighed, then the finished candidates in reranked order with a button to pick one. Model text
// only ever goes into textContent; elements come from createElement/createElementNS.
//
// Events (webapp/beam_schema.py): {type: "beam_step", nodes: [{id, parent, token_id, text,
// logprob, score, status, step}], dropped: [ids]} per step; {type: "beam_done", candidates, tree,
// record_id, reranked, finish_reason, ...} last. The final step's nodes arrive only in `tree`.

import { createTree, el, fmt } from "./beam_tree.js";

const MAX_SAVED_NODES = 2500;  // larger trees are not kept in localStorage (the candidates are)
const signed = (x, digits = 3) => (typeof x === "number" && x >= 0 ? "+" : "") + fmt(x, digits);

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
