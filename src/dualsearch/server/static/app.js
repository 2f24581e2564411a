// dualsearch search page: plain JavaScript, no build step, no asset from outside this server.
//
// The page asks the server what it offers (/openapi.json for the search parameters, /api/info for
// what the index holds) and shows only the controls the API supports. The search lives in the URL
// (?q=..&like=ID&add=..&sub=..&in=..&after=..&before=..&camera=..&format=..&sort=..&collapse=true&k=N),
// so Back/Forward move through searches and a copied URL shows the same results.
"use strict";
const $ = (id) => document.getElementById(id);
const grid = $("grid"), statusLine = $("status"), viewer = $("viewer");
const PAGE = 24, MAX_PAGE = 100;
const FILTERS = ["in", "after", "before", "camera", "format", "sort", "collapse"];
const api = { get: new Set(), post: new Set(), image: new Set() };  // parameters each search route takes
const uploads = new Map();  // history entries of image searches keep their file here (a URL cannot hold it)
let info = {};
let uploadSeq = 0;
const view = { state: null, hits: [], offset: 0, total: null, loading: false, done: true, seq: 0, current: -1 };

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== ""));
  return node;
}

async function getJSON(url, options) {
  const resp = await fetch(url, options);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const d = body.detail;  // a string, or FastAPI's list of validation errors
    const detail = typeof d === "string" ? d : Array.isArray(d) ?
      d.map((e) => `${(e.loc || []).slice(-1)[0] || "request"}: ${e.msg}`).join("; ") : resp.statusText;
    throw new Error(detail);
  }
  return body;
}

// ------------------------------------------------------------------ what the server offers
function paramNames(op) {
  return new Set(((op || {}).parameters || []).map((p) => p.name));
}

function bodyNames(schema, op) {
  const ref = op?.requestBody?.content?.["application/json"]?.schema?.$ref || "";
  const props = schema.components?.schemas?.[ref.split("/").pop()]?.properties || {};
  return new Set(Object.keys(props));
}

async function discover() {
  const [schema, inf] = await Promise.all([
    getJSON("/openapi.json").catch(() => ({})),
    getJSON("/api/info").catch(() => getJSON("/health").catch(() => ({}))),
  ]);
  const paths = schema.paths || {};
  api.get = paramNames(paths["/api/search"]?.get);
  api.post = bodyNames(schema, paths["/api/search"]?.post);
  api.image = paramNames(paths["/api/search/image"]?.post);
  info = inf || {};
  setupFilters();
}

// /api/info lists folders, cameras and formats as {name, count} (or plain names)
function fillSelect(select, values, label = (v) => v) {
  for (const v of values || []) {
    const name = typeof v === "string" ? v : v.name;
    const count = typeof v === "object" && v.count !== undefined ? ` (${v.count.toLocaleString()})` : "";
    select.append(el("option", { value: name, textContent: label(name) + count }));
  }
  return (values || []).length > 0;
}

function setupFilters() {
  const offered = {
    in: fillSelect($("folder"), info.folders, folderLabel), after: true, before: true, sort: true, collapse: true,
    camera: fillSelect($("camera"), info.cameras), format: fillSelect($("format"), info.formats),
  };
  for (const label of document.querySelectorAll("[data-param]")) {
    const name = label.dataset.param;
    label.hidden = !(offered[name] && api.get.has(name));
  }
  for (const id of ["after", "before"]) {
    if (info.date_min) $(id).min = info.date_min.slice(0, 10);
    if (info.date_max) $(id).max = info.date_max.slice(0, 10);
  }
  $("browse").hidden = !api.get.has("sort");
}

function folderLabel(name) {
  return name === "" || name === "." ? "(top folder)" : name;
}

// ------------------------------------------------------------------ state <-> URL and controls
function emptyState() {
  return { q: "", like: "", add: [], sub: [], in: [], after: "", before: "", camera: "", format: "", sort: "",
           collapse: false, k: PAGE, upload: 0, uploadName: "", w: 1 };
}

function readURL() {
  const p = new URLSearchParams(location.search), s = emptyState();
  for (const key of ["q", "like", "after", "before", "camera", "format", "sort"]) s[key] = p.get(key) || "";
  for (const key of ["add", "sub", "in"]) s[key] = p.getAll(key).filter(Boolean);
  s.collapse = p.get("collapse") === "true";
  const k = parseInt(p.get("k"), 10);
  s.k = k >= 1 ? Math.min(k, MAX_PAGE) : PAGE;
  s.like = /^\d+$/.test(s.like) ? s.like : "";
  const kept = history.state || {};
  if (kept.upload && uploads.has(kept.upload)) Object.assign(s, { upload: kept.upload, uploadName: kept.uploadName, w: kept.w });
  return s;
}

function toURL(s) {
  const p = new URLSearchParams();
  for (const key of ["q", "like", "after", "before", "camera", "format", "sort"]) if (s[key]) p.set(key, s[key]);
  for (const key of ["add", "sub", "in"]) for (const v of s[key]) p.append(key, v);
  if (s.collapse) p.set("collapse", "true");
  if (s.k !== PAGE) p.set("k", String(s.k));
  const query = p.toString();
  return query ? `?${query}` : location.pathname;
}

const terms = (text) => text.split(",").map((t) => t.trim()).filter(Boolean);

function fromControls(base) {
  const s = { ...base, q: $("q").value.trim(), add: terms($("add").value), sub: terms($("subtract").value) };
  s.in = $("folder").value ? [$("folder").value] : [];
  for (const key of ["after", "before", "camera", "format"]) s[key] = $(key).value;
  s.sort = $("sort").value === "score" ? "" : $("sort").value;
  s.collapse = $("collapse").checked;
  s.w = parseFloat($("weight").value);
  return s;
}

function toControls(s) {
  $("q").value = s.q;
  $("add").value = s.add.join(", ");
  $("subtract").value = s.sub.join(", ");
  $("folder").value = s.in[0] || "";
  for (const key of ["after", "before", "camera", "format"]) $(key).value = s[key];
  $("sort").value = s.sort || "score";
  $("collapse").checked = s.collapse;
  $("weight").value = String(s.w);
  $("weight-value").textContent = s.w.toFixed(1);
  if (s.add.length || s.sub.length || s.in.length || s.after || s.before || s.camera || s.format) $("options").open = true;
  showImageQuery(s);
}

const ranked = (s) => Boolean(s && (s.q || s.like || s.upload || s.add.length));  // scores mean something
const hasQuery = (s) => Boolean(s.q || s.like || s.upload || s.add.length || s.sort === "date");

function navigate(s) {
  history.pushState({ upload: s.upload, uploadName: s.uploadName, w: s.w }, "", toURL(s));
  toControls(s);
  run(s);
}

// ------------------------------------------------------------------ requests
// The filters a route takes; "in", "camera" and "format" are lists in the API (repeatable parameters)
function addFilters(s, supported, put) {
  for (const name of FILTERS) {
    if (!supported.has(name)) continue;
    if (name === "in") {
      if (s.in.length) put(name, s.in);
    } else if (name === "collapse") {
      if (s.collapse) put(name, true);
    } else if (s[name]) {
      put(name, name === "camera" || name === "format" ? [s[name]] : s[name]);
    }
  }
}

function queryString(params) {
  const p = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of Array.isArray(value) ? value : [value]) if (v !== undefined && v !== null && v !== "") p.append(key, String(v));
  }
  return p.toString();
}

// One page of results: {results, total, more}; a route without `offset` has one page only.
async function fetchPage(s, offset) {
  const route = s.upload ? api.image : s.like || s.add.length || s.sub.length ? api.post : api.get;
  const paged = route.has("offset");
  const page = paged ? { k: s.k, offset } : { k: s.k };
  let body;
  if (s.upload) {
    const params = { ...page, q: s.q || undefined, image_weight: route.has("image_weight") && s.q ? s.w : undefined };
    addFilters(s, route, (key, value) => { params[key] = value; });
    const form = new FormData();
    form.append("file", uploads.get(s.upload));
    body = await getJSON(`/api/search/image?${queryString(params)}`, { method: "POST", body: form });
  } else if (route === api.post) {
    const json = { ...page, q: s.q || null, add: s.add, subtract: s.sub, like_id: s.like ? Number(s.like) : null };
    addFilters(s, route, (key, value) => { json[key] = value; });
    for (const key of Object.keys(json)) if (!route.has(key)) delete json[key];
    body = await getJSON("/api/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(json) });
  } else {
    const params = { q: s.q, ...page };
    addFilters(s, route, (key, value) => { params[key] = value; });
    body = await getJSON(`/api/search?${queryString(params)}`);
  }
  const total = typeof body.total === "number" ? body.total : null;
  const more = paged && body.results.length > 0 && (total === null ? body.results.length >= s.k : offset + body.results.length < total);
  return { results: body.results, total, more };
}

function run(s) {
  view.state = s;
  view.seq += 1;
  view.hits = [];
  view.offset = 0;
  view.total = null;
  view.loading = false;
  grid.replaceChildren();
  $("landing").hidden = hasQuery(s);
  view.done = !hasQuery(s);
  if (!hasQuery(s)) { showLanding(); return; }
  document.title = `${describe(s)} · dualsearch`;
  loadPage();
}

async function loadPage() {
  if (view.loading || view.done) return;
  view.loading = true;
  const seq = view.seq, start = view.offset;
  showStatus();
  let page;
  try {
    page = await fetchPage(view.state, start);
  } catch (err) {
    if (seq !== view.seq) return;
    Object.assign(view, { loading: false, done: true });
    showStatus(err.message);
    return;
  }
  if (seq !== view.seq) return;  // a newer search started meanwhile
  const seen = new Set(view.hits.map((h) => h.id));
  const fresh = page.results.filter((h) => !seen.has(h.id));
  grid.append(...fresh.map((h, i) => card(h, view.hits.length + i)));
  view.hits.push(...fresh);
  Object.assign(view, { offset: start + page.results.length, total: page.total, done: !page.more, loading: false });
  showStatus();
  if (viewer.open) fillViewer();
  if (!view.done && nearBottom()) loadPage();
}

// ------------------------------------------------------------------ rendering
function describe(s) {
  const parts = [];
  if (s.q) parts.push(`“${s.q}”`);
  if (s.upload) parts.push(`${s.q ? "+ " : ""}image ${s.uploadName}`);
  if (s.like) parts.push(`${s.q ? "+ " : ""}images like #${s.like}`);
  if (s.add.length) parts.push(`+ ${s.add.join(", ")}`);
  if (s.sub.length) parts.push(`− ${s.sub.join(", ")}`);
  if (!parts.length && s.sort === "date") return "all images, newest first";
  return parts.join(" ") || "search";
}

function showStatus(error) {
  statusLine.classList.toggle("error", Boolean(error));
  $("more").hidden = view.done || Boolean(error);
  if (error) { statusLine.textContent = `Could not search: ${error}`; return; }
  if (!hasQuery(view.state || emptyState())) { statusLine.textContent = ""; return; }
  const n = view.hits.length, s = view.state;
  if (view.loading && n === 0) { statusLine.textContent = "Searching…"; return; }
  const filtered = s.in.length || s.after || s.before || s.camera || s.format;
  if (n === 0) { statusLine.textContent = `No results for ${describe(s)}${filtered ? " with these filters" : ""}`; return; }
  const of = view.total !== null ? ` of ${view.total.toLocaleString()}` : view.done ? "" : "+";
  const weak = view.hits.filter((h) => h.weak).length;
  statusLine.textContent = `${n.toLocaleString()}${of} results for ${describe(s)}` +
    (weak ? ` · ${weak} weak ${weak === 1 ? "match" : "matches"} (faded)` : "") + (view.loading ? " · loading more…" : "");
}

function card(hit, index) {
  const img = el("img", { src: hit.thumb, alt: hit.name, loading: "lazy", decoding: "async" });
  if (hit.width && hit.height) { img.width = hit.width; img.height = hit.height; }
  const open = el("button", { type: "button", className: "thumb", title: hit.path || hit.name }, img);
  open.setAttribute("aria-label", `Open ${hit.name}${hit.weak ? " (weak match)" : ""}`);
  open.addEventListener("click", () => openViewer(index));
  const badges = el("span", { className: "badges" },
    hit.weak ? el("span", { className: "badge weak-badge", textContent: "weak match" }) : null,
    hit.duplicates > 1 ? el("span", { className: "badge", textContent: `${hit.duplicates} copies` }) : null);
  const name = el("span", { className: "name", textContent: hit.name, title: hit.path || hit.name });
  const score = ranked(view.state) ? el("span", { className: "score", textContent: hit.score.toFixed(3), title: "similarity score" }) : null;
  const sub = [hit.date ? hit.date.slice(0, 10) : "", hit.folder ? hit.folder : ""].filter(Boolean).join(" · ");
  const like = el("button", { type: "button", className: "like small", textContent: "Similar" });
  like.setAttribute("aria-label", `Search by ${hit.name}`);
  like.addEventListener("click", () => searchLike(hit));
  const li = el("li", { className: "card" + (hit.weak ? " weak" : "") }, open, badges,
    el("div", { className: "meta" }, name, score),
    el("div", { className: "meta sub" }, el("span", { className: "when", textContent: sub }), like));
  li.dataset.id = hit.id;
  return li;
}

function showLanding() {
  const facts = [];
  if (typeof info.images === "number") facts.push(`${info.images.toLocaleString()} ${info.images === 1 ? "image" : "images"}`);
  if (info.model) facts.push(`model ${info.model}`);
  if (info.date_min && info.date_max) facts.push(`taken ${info.date_min.slice(0, 10)} to ${info.date_max.slice(0, 10)}`);
  $("landing-facts").textContent = facts.length ? `This index holds ${facts.join(" · ")}.` : "";
  const examples = (info.examples || []).slice(0, 8);
  $("examples").replaceChildren(...examples.map((text) => {
    const b = el("button", { type: "button", className: "example", textContent: text });
    b.addEventListener("click", () => navigate({ ...fromControls(emptyState()), q: text, k: view.state?.k || PAGE }));
    return el("li", {}, b);
  }));
  $("examples-box").hidden = examples.length === 0;
  statusLine.textContent = "";
  $("more").hidden = true;
  document.title = "dualsearch";
}

function showImageQuery(s) {
  const box = $("image-query");
  box.hidden = !(s.upload || s.like);
  if (box.hidden) return;
  const thumb = $("image-query-thumb");
  if (thumb.dataset.src) URL.revokeObjectURL(thumb.dataset.src);
  thumb.dataset.src = "";
  if (s.upload) { thumb.src = thumb.dataset.src = URL.createObjectURL(uploads.get(s.upload)); } else { thumb.src = `/thumb/${s.like}`; }
  thumb.alt = s.upload ? `query image ${s.uploadName}` : `query image #${s.like}`;
  $("image-query-name").textContent = s.upload ? s.uploadName : `like image #${s.like}`;
  if (s.like) {  // its name, when the server can tell
    getJSON(`/api/image/${s.like}/info`).then((h) => {
      if (view.state?.like !== s.like) return;
      $("image-query-name").textContent = `like ${h.name}`;
      thumb.alt = `query image ${h.name}`;
    }).catch(() => {});
  }
  $("weight-row").hidden = !(s.upload && api.image.has("image_weight"));
}

// ------------------------------------------------------------------ the viewer
function row(term, value) {
  return value === null || value === undefined || value === "" ? [] : [el("dt", { textContent: term }), el("dd", { textContent: value })];
}

function fillViewer() {
  const h = view.hits[view.current];
  if (!h) return;
  $("full").src = h.image;
  $("full").alt = h.name;
  $("viewer-title").textContent = h.name;
  const date = h.date ? h.date.slice(0, 16).replace("T", " ") + (h.date_offset ? ` (UTC${h.date_offset})` : "") +
    (h.date_source === "mtime" ? " (file date, no EXIF)" : "") : null;
  const place = typeof h.lat === "number" && typeof h.lon === "number" ? `${h.lat.toFixed(5)}, ${h.lon.toFixed(5)}` : null;
  $("details").replaceChildren(
    ...row("Folder", h.folder === undefined ? null : folderLabel(h.folder)), ...row("Path", h.path),
    ...row("Taken", date), ...row("Dimensions", h.width && h.height ? `${h.width} × ${h.height} px` : null),
    ...row("Format", h.format), ...row("Camera", h.camera), ...row("Location", place),
    ...row("Score", ranked(view.state) ? h.score.toFixed(3) + (h.weak ? " (weak match)" : "") : null),
    ...row("Copies", h.duplicates > 1 ? `${h.duplicates} near-identical images` : null));
  $("download").href = $("original").href = h.image;
  $("download").download = h.name;
  $("prev").disabled = view.current === 0;
  $("next").disabled = view.current >= view.hits.length - 1 && view.done;
  const total = view.total !== null ? view.total : view.hits.length;
  $("position").textContent = `${view.current + 1} of ${total}`;
  if (view.current >= view.hits.length - 3) loadPage();
}

function openViewer(index) {
  view.current = index;
  fillViewer();
  if (!viewer.open) viewer.showModal();
}

function step(delta) {
  const next = view.current + delta;
  if (next < 0 || next >= view.hits.length) return;
  view.current = next;
  fillViewer();
  grid.children[next]?.scrollIntoView({ block: "nearest" });
}

function searchLike(hit) {
  if (viewer.open) viewer.close();
  navigate({ ...view.state, q: "", add: [], sub: [], upload: 0, uploadName: "", like: String(hit.id) });
}

// ------------------------------------------------------------------ image queries
function searchFile(file) {
  if (!file || !file.type.startsWith("image/")) { showStatus(`${file ? file.name : "that"} is not an image`); return; }
  uploadSeq += 1;
  uploads.set(uploadSeq, file);
  navigate({ ...fromControls(view.state || emptyState()), like: "", upload: uploadSeq, uploadName: file.name || "pasted image" });
}

let dragDepth = 0;
const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
window.addEventListener("dragenter", (e) => { if (!hasFiles(e)) return; e.preventDefault(); dragDepth += 1; $("drop").hidden = false; });
window.addEventListener("dragleave", () => { dragDepth -= 1; if (dragDepth <= 0) { dragDepth = 0; $("drop").hidden = true; } });
window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  if (e.dataTransfer?.files?.[0]) searchFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); searchFile(file); }
});

// ------------------------------------------------------------------ wiring
function nearBottom() {
  return $("sentinel").getBoundingClientRect().top < window.innerHeight + 300;
}

function wire() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const s = fromControls(view.state || emptyState());
    if (hasQuery(s)) navigate(s); else $("q").focus();
  });
  $("file").addEventListener("change", (e) => { searchFile(e.target.files[0]); e.target.value = ""; });
  $("image-query-clear").addEventListener("click", () => navigate({ ...fromControls(view.state), like: "", upload: 0, uploadName: "" }));
  $("weight").addEventListener("input", () => { $("weight-value").textContent = parseFloat($("weight").value).toFixed(1); });
  $("weight").addEventListener("change", () => { if (view.state?.q) navigate(fromControls(view.state)); });
  for (const id of ["folder", "after", "before", "camera", "format", "sort", "collapse"]) {
    $(id).addEventListener("change", () => { if (hasQuery(view.state || emptyState())) navigate(fromControls(view.state)); });
  }
  $("load-more").addEventListener("click", () => loadPage());
  $("browse").addEventListener("click", () => navigate({ ...emptyState(), k: view.state?.k || PAGE, sort: "date" }));
  new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) loadPage(); },
    { rootMargin: "0px 0px 300px 0px" }).observe($("sentinel"));
  $("similar").addEventListener("click", () => searchLike(view.hits[view.current]));
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (e) => { if (e.target === viewer) viewer.close(); });
  viewer.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
    if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
  });
  window.addEventListener("popstate", () => { if (viewer.open) viewer.close(); const s = readURL(); toControls(s); run(s); });
}

async function start() {
  wire();
  await discover();
  const s = readURL();
  history.replaceState({ upload: s.upload, uploadName: s.uploadName, w: s.w }, "", toURL(s));
  toControls(s);
  run(s);
  document.body.dataset.ready = "true";
}

start();
