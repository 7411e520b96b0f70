// medrag web page: no build step, no dependencies. Text from the server is inserted with
// textContent only (reports are data, never markup).
"use strict";

const $ = (id) => document.getElementById(id);
let file = null;
let authorized = false; // the server answered a data route: a valid key, or --allow-anonymous
let lastAnatomy = "";  // the anatomy the shown results were conditioned on
const thumbURLs = [];

function key() { return localStorage.getItem("medrag-key") || ""; }
function status(msg) { $("status").textContent = msg; }

async function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + key() }, opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(r.status + ": " + detail);
  }
  return r;
}

async function thumb(url) {
  const r = await api(url);
  const u = URL.createObjectURL(await r.blob());
  thumbURLs.push(u);
  return u;
}

function option(select, value) {
  const o = document.createElement("option");
  o.value = value; o.textContent = value; select.appendChild(o);
}

async function loadTaxonomy() {
  try {
    const t = await (await api("/api/taxonomy")).json();
    const a = $("anatomy"), f = $("finding");
    a.length = 1; f.length = 1;
    t.conditioned.forEach((x) => option(a, x));
    t.findings.forEach((x) => option(f, x));
    authorized = true;
    status("");
    updateButton();
  } catch (e) {
    authorized = false;
    status(key() ? "API key rejected (" + e.message + ")" : "Enter an API key");
    updateButton();
  }
}

// a key is needed only where the server asks for one: anonymous servers work without typing any
function updateButton() { $("go").disabled = !(file && authorized); }

function pick(f) {
  if (!f) return;
  file = f;
  const img = $("preview");
  if (/\.(png|jpe?g)$/i.test(f.name) || /^image\//.test(f.type)) {
    img.src = URL.createObjectURL(f); img.hidden = false;
  } else {
    img.hidden = true;
  }
  $("drop").querySelector("p").textContent = f.name;
  updateButton();
}

// Report text with entity mentions wrapped in <mark>; the query's entities stand out.
function reportNode(text, highlights) {
  const p = document.createElement("p");
  p.className = "report";
  if (!text) { p.textContent = "(no report)"; return p; }
  const spans = (highlights || []).slice().sort((a, b) => a.start - b.start);
  let pos = 0;
  for (const h of spans) {
    if (h.start < pos) continue;
    p.appendChild(document.createTextNode(text.slice(pos, h.start)));
    const m = document.createElement("mark");
    m.textContent = text.slice(h.start, h.end);
    m.title = h.anatomy + " | " + h.finding + " | " + h.status;
    m.className = (h.matched ? "matched " : "") + h.status;
    p.appendChild(m);
    pos = h.end;
  }
  p.appendChild(document.createTextNode(text.slice(pos)));
  return p;
}

async function render(res) {
  thumbURLs.splice(0).forEach((u) => URL.revokeObjectURL(u));
  const box = $("results");
  box.textContent = "";
  $("summary").textContent = res.hits.length + " cases, " + res.mode + ", conditioning: " + res.conditioning +
    ", " + res.took_ms + " ms";
  for (const h of res.hits) {
    const card = document.createElement("article");
    card.className = "card"; card.tabIndex = 0; card.dataset.study = h.study_id;
    const img = document.createElement("img");
    img.alt = "study " + h.study_id;
    card.appendChild(img);
    let heat = null;
    if (lastAnatomy && h.thumbnail) { // where the conditioned query looked, beside the image
      heat = document.createElement("img");
      heat.className = "attention";
      heat.alt = "attention of the " + lastAnatomy + " query on study " + h.study_id;
      card.appendChild(heat);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const s = document.createElement("span"); s.className = "score"; s.textContent = h.score.toFixed(3);
    const id = document.createElement("span"); id.textContent = h.study_id + (h.modality ? " · " + h.modality : "");
    meta.append(s, id);
    card.appendChild(meta);
    if (h.matched_entities.length) {
      const t = document.createElement("div"); t.className = "tags";
      t.textContent = h.matched_entities.map((e) => `${e.anatomy}: ${e.finding} (${e.status})`).join(", ");
      card.appendChild(t);
    }
    card.appendChild(reportNode(h.report, h.highlights));
    card.addEventListener("click", () => openCase(h.study_id));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") openCase(h.study_id); });
    box.appendChild(card);
    if (h.thumbnail) thumb(h.thumbnail).then((u) => { img.src = u; img.dataset.loaded = "1"; }).catch(() => {});
    if (heat) {
      thumb(h.thumbnail + "/attention?anatomy=" + encodeURIComponent(lastAnatomy))
        .then((u) => { heat.src = u; heat.dataset.loaded = "1"; })
        .catch(() => { heat.remove(); }); // encoders without attention (pixels, CLIP) show none
    }
  }
}

async function openCase(id) {
  try {
    const c = await (await api("/api/cases/" + encodeURIComponent(id))).json();
    $("case-title").textContent = "Study " + c.study_id + (c.modality ? " · " + c.modality : "") +
      (c.study_date ? " · " + c.study_date : "");
    const imgs = $("case-images"); imgs.textContent = "";
    for (const u of c.images) {
      const i = document.createElement("img"); i.alt = "image of study " + c.study_id;
      imgs.appendChild(i);
      thumb(u).then((b) => { i.src = b; });
    }
    $("case-report").replaceWith(Object.assign(reportNode(c.report, c.highlights), { id: "case-report" }));
    const ul = $("case-entities"); ul.textContent = "";
    c.entities.forEach((e) => {
      const li = document.createElement("li");
      li.textContent = e.anatomy + " | " + e.finding + " | " + e.status + "  (\u201c" + e.text + "\u201d)";
      ul.appendChild(li);
    });
    $("case").showModal();
  } catch (e) { status(e.message); }
}

async function search(ev) {
  ev.preventDefault();
  if (!file) return;
  const fd = new FormData();
  fd.append("image", file);
  fd.append("k", $("k").value || "12");
  if ($("anatomy").value) fd.append("anatomy", $("anatomy").value);
  if ($("finding").value) {
    fd.append("finding", $("finding").value);
    fd.append("finding_by", $("finding-by").value);
  }
  $("go").disabled = true; status("searching...");
  try {
    const res = await (await api("/api/search/image", { method: "POST", body: fd })).json();
    // the space searched names the anatomy (asking a finding of the image picks its anatomy)
    lastAnatomy = res.conditioning.startsWith("embedding:") ? res.space.split("@")[1] || "" : "";
    await render(res);
    status("");
  } catch (e) { status(e.message); }
  finally { updateButton(); }
}

$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem("medrag-key", $("apikey").value.trim());
  $("apikey").value = "";
  loadTaxonomy();
});
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });
$("file").addEventListener("change", (e) => pick(e.target.files[0]));
$("searchform").addEventListener("submit", search);
loadTaxonomy();
