// dualsearch search page: plain JavaScript, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const grid = $("grid"), status = $("status"), viewer = $("viewer");
let current = null;

function show(results, label) {
  grid.replaceChildren();
  status.textContent = results.length ? `${results.length} results${label ? " for " + label : ""}` : "no results";
  for (const r of results) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = r.id;
    const img = document.createElement("img");
    img.src = r.thumb;
    img.alt = r.name;
    img.loading = "lazy";
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const name = document.createElement("span");
    name.textContent = r.name;
    name.title = r.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    meta.append(name, score);
    card.append(img, meta);
    card.addEventListener("click", () => open(r));
    grid.append(card);
  }
}

async function call(url, options) {
  status.textContent = "searching…";
  try {
    const resp = await fetch(url, options);
    const body = await resp.json();
    if (!resp.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    return body;
  } catch (err) {
    status.textContent = "error: " + err.message;
    throw err;
  }
}

async function searchText(q) {
  const body = await call(`/api/search?q=${encodeURIComponent(q)}&k=24`);
  show(body.results, `“${q}”`);
}

async function searchImage(file) {
  const form = new FormData();
  form.append("file", file);
  const body = await call("/api/search/image?k=24", { method: "POST", body: form });
  show(body.results, file.name);
}

async function similar(id, name) {
  const body = await call(`/api/similar/${id}?k=24`);
  show(body.results, `images like ${name}`);
}

function open(r) {
  current = r;
  $("full").src = r.image;
  $("full").alt = r.name;
  $("full-caption").textContent = `${r.name} — score ${r.score.toFixed(3)}`;
  viewer.showModal();
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) searchText(q);
});
$("file").addEventListener("change", (e) => { if (e.target.files[0]) searchImage(e.target.files[0]); });
$("similar").addEventListener("click", () => { viewer.close(); if (current) similar(current.id, current.name); });
$("close").addEventListener("click", () => viewer.close());

let depth = 0;
window.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
window.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  depth = 0;
  $("drop").hidden = true;
  const file = e.dataTransfer.files[0];
  if (file) searchImage(file);
});
