"use strict";
// The page's only script: classify uploads, or image URLs where the server fetches them (as
// /v1/models says), through /predict (/explain with heatmaps on) with the model version picked
// from /v1/models, show it from /v1/model, mark answers from the server's cache (X-Cache), list
// each image's most similar others from /embed, and turn the Prometheus text at /metrics into a
// live panel. No framework, no build step.

const LIVE_REFRESH_MS = 1500;
const LIVE_WINDOW_MS = 10000;
const MAX_PARALLEL_UPLOADS = 4;

const history = []; // metric snapshots over the last LIVE_WINDOW_MS
let maxBatch = Infinity; // from /v1/model

const PLAIN_ERRORS = {
  unsupported_media_type:
    "This file is not an image the service reads (JPEG, PNG, WebP, AVIF, HEIC, BMP, GIF or TIFF).",
  invalid_image: "This looks like an image but could not be decoded: it may be corrupt or cut short.",
  empty_upload: "The file is empty.",
  payload_too_large: "The file is larger than the service accepts.",
  too_many_pixels: "The image has more pixels than the service accepts.",
  invalid_multipart: "The upload could not be read as a form upload.",
  invalid_parameter: "'Labels per image' is out of range for this model.",
  overloaded: "The service is busy right now. Try again in a moment.",
  rate_limited: "This key has sent more requests than its rate allows. Try again in a moment.",
  not_ready: "The model is still warming up. Try again in a moment.",
  shutting_down: "The service is shutting down.",
  timeout: "The service was too busy to answer in time.",
  inference_failed: "The model failed on the batch holding this image.",
  unauthorized: "The API key is missing or not accepted.",
  url_not_allowed: "The service does not fetch images from this address.",
  url_fetch_failed: "The service could not fetch an image from this URL.",
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function formatMs(seconds) {
  if (seconds === null || !Number.isFinite(seconds)) return "–";
  return seconds < 1 ? `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms` : `${seconds.toFixed(2)} s`;
}

function barList(rows) {
  // rows: [{name, fraction, text}]; the bar is decoration, the text carries the value.
  return el("ul", { className: "bars" }, ...rows.map(({ name, fraction, text }) => {
    const fill = el("span");
    fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    const bar = el("span", { className: "bar" }, fill);
    bar.setAttribute("aria-hidden", "true");
    return el("li", {}, el("span", { className: "name", textContent: name }), bar,
      el("span", { className: "value", textContent: text }));
  }));
}

// ---- classify, explain, embed ---------------------------------------------------------------

const MAX_SIMILAR = 3;
const uploads = new WeakMap(); // card -> its File or URL, sent again to /explain and /embed
const embeddings = new Map(); // card -> {model, vector}, for the similar images
// Picker values whose model file was exported before heatmaps or embeddings (400 output_unavailable).
const lacking = { heatmaps: new Set(), embeddings: new Set() };

// source: a File, or the URL (a string) of an image the server fetches.
function resultCard(source) {
  const byUrl = typeof source === "string";
  const name = byUrl ? source : source.name;
  const card = el("li", { className: "card pending" });
  card.dataset.filename = name;
  card.dataset.choice = $("model-choice").value; // the model that answers for it, whatever is picked later
  const thumb = el("img", { alt: "", referrerPolicy: "no-referrer" });
  thumb.addEventListener("error", () => thumb.removeAttribute("src")); // no broken-image icon
  if (byUrl) thumb.src = source;
  else if (source.type.startsWith("image/")) thumb.src = URL.createObjectURL(source);
  const body = el("div", {}, el("h3", { textContent: name }),
    el("p", { className: "meta", textContent: "classifying…" }));
  card.append(el("div", { className: "thumb" }, thumb), body);
  uploads.set(card, source);
  return card;
}

function showPredictions(card, result, seconds) {
  const body = card.lastChild;
  const top = result.predictions[0];
  card.className = "card ok";
  card.dataset.top1 = top.label;
  body.querySelector(".meta").textContent =
    `top-1 ${top.label} (${(top.score * 100).toFixed(1)}%) · ${formatMs(seconds)}`;
  body.append(barList(result.predictions.map((p) => ({
    name: p.label, fraction: p.score, text: `${(p.score * 100).toFixed(1)}%`,
  }))));
}

// X-Cache: hit (or partial) when the server answered from its cache instead of computing.
function markCached(card, cache) {
  if (cache !== "hit" && cache !== "partial") return;
  card.dataset.cache = cache;
  card.lastChild.querySelector(".meta").append(el("span", {
    className: "badge", textContent: "cached", title: "answered from the server's cache",
  }));
}

// The heatmap's PNG has the image's shape: laid over the thumbnail in the same box, it lines up.
function showHeatmap(card, heatmap) {
  card.querySelector(".thumb").append(
    el("img", { className: "heatmap", alt: "", src: `data:image/png;base64,${heatmap.png}` }));
  card.lastChild.querySelector(".meta").after(
    el("p", { className: "heatmap-of", textContent: `heatmap of ${heatmap.label}` }));
  card.dataset.heatmap = heatmap.label;
}

function showError(card, status, code, message, seconds) {
  const body = card.lastChild;
  card.className = "card error";
  card.dataset.error = code;
  body.querySelector(".meta").textContent = `HTTP ${status} · ${formatMs(seconds)}`;
  body.append(
    el("p", { className: "problem", textContent: PLAIN_ERRORS[code] || "The service refused this file." }),
    el("p", { className: "detail", textContent: `${code}: ${message}` }),
  );
}

function addNote(card, text) {
  card.lastChild.append(el("p", { className: "detail", textContent: text }));
}

function labelsPerImage() {
  const topK = $("top-k").value.trim();
  return topK ? { top_k: topK } : {};
}

// A card's image as a request body: its file as a form upload, or its URL as {"urls": [url]}.
function imageBody(card) {
  const source = uploads.get(card);
  if (typeof source === "string") {
    return { body: JSON.stringify({ urls: [source] }), headers: { "Content-Type": "application/json" } };
  }
  const form = new FormData();
  form.append("files", source, source.name);
  return { body: form, headers: {} };
}

// One image to an inference endpoint, for the model picked when its card was made. Throws when
// the service cannot be reached.
async function post(path, card, params = {}) {
  const { body, headers } = imageBody(card);
  const query = new URLSearchParams({ ...chosenModel(card.dataset.choice), ...params });
  const started = performance.now();
  const response = await fetch(query.size ? `${path}?${query}` : path,
    { method: "POST", body, headers: { ...headers, ...authHeaders() } });
  const seconds = (performance.now() - started) / 1000;
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // Not JSON: reported with the status line.
  }
  const error = (payload && payload.error) || { code: "http_error", message: response.statusText };
  const cache = response.headers.get("X-Cache");
  return { ok: response.ok && payload !== null, status: response.status, payload, error, seconds, cache };
}

// A file exported before heatmaps and embeddings still classifies: say so once, for that model.
function lacks(answer, kind, card) {
  if (answer.status !== 400 || answer.error.code !== "output_unavailable") return false;
  lacking[kind].add(card.dataset.choice);
  showModelNotes();
  return true;
}

function showModelNotes() {
  const chosen = $("model-choice").value;
  const notes = [];
  if (lacking.heatmaps.has(chosen)) {
    notes.push("This model has no heatmaps: its file was exported before them.");
  }
  if (lacking.embeddings.has(chosen)) {
    notes.push("This model has no embeddings, so similar images are not shown.");
  }
  $("model-notes").textContent = notes.join(" ");
}

const wantsHeatmap = (card) => $("heatmap").checked && !lacking.heatmaps.has(card.dataset.choice);

// /explain answers the top-k too: with heatmaps on it replaces /predict, off it costs nothing.
async function classify(card) {
  let answer = null;
  try {
    if (wantsHeatmap(card)) answer = await post("/explain", card, labelsPerImage());
    if (!answer || lacks(answer, "heatmaps", card)) answer = await post("/predict", card, labelsPerImage());
  } catch (error) {
    showError(card, "–", "network", `could not reach the service (${error.message})`, null);
    return;
  }
  if (!answer.ok) {
    showError(card, answer.status, answer.error.code, answer.error.message, answer.seconds);
    return;
  }
  const result = answer.payload.results[0];
  showPredictions(card, result, answer.seconds);
  markCached(card, answer.cache);
  if (result.heatmap) showHeatmap(card, result.heatmap);
  else if (wantsHeatmap(card)) await explain(card); // turned on while this one was classified
  await embed(card);
}

// The heatmap of a card already classified.
async function explain(card) {
  if (card.dataset.heatmap !== undefined || !wantsHeatmap(card)) return;
  card.dataset.heatmap = ""; // asked for
  let answer;
  try {
    answer = await post("/explain", card, labelsPerImage());
  } catch (error) {
    answer = { ok: false, status: "–", error: { code: "network", message: error.message } };
  }
  if (answer.ok) {
    showHeatmap(card, answer.payload.results[0].heatmap);
    return;
  }
  delete card.dataset.heatmap; // asked again the next time heatmaps are turned on
  if (!lacks(answer, "heatmaps", card)) {
    addNote(card, `No heatmap (HTTP ${answer.status}): ${answer.error.code}: ${answer.error.message}`);
  }
}

async function embed(card) {
  if (lacking.embeddings.has(card.dataset.choice)) return;
  let answer;
  try {
    answer = await post("/embed", card, { normalize: "true" });
  } catch (error) {
    answer = { ok: false, status: "–", error: { code: "network", message: error.message } };
  }
  if (answer.ok) {
    const { model_name: name, model_version: version, results } = answer.payload;
    embeddings.set(card, { model: `${name}@${version}`, vector: results[0].embedding });
    showSimilar();
  } else if (!lacks(answer, "embeddings", card)) {
    addNote(card, `Not compared with the others (HTTP ${answer.status}): ${answer.error.code}`);
  }
}

function dot(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i += 1) sum += a[i] * b[i];
  return sum;
}

// Each image's nearest others by cosine similarity (the dot product of normalised embeddings),
// among the images embedded by the same model version.
function showSimilar() {
  for (const [card, mine] of embeddings) {
    const nearest = [...embeddings]
      .filter(([other, theirs]) => other !== card && theirs.model === mine.model)
      .map(([other, theirs]) => ({ name: other.dataset.filename, similarity: dot(mine.vector, theirs.vector) }))
      .sort((a, b) => b.similarity - a.similarity)
      .slice(0, MAX_SIMILAR);
    if (!nearest.length) continue;
    const list = el("ol", {}, ...nearest.map(({ name, similarity }) => {
      const item = el("li", {}, el("span", { className: "name", textContent: name }),
        el("span", { className: "value", textContent: similarity.toFixed(2) }));
      item.dataset.filename = name;
      return item;
    }));
    const section = el("div", { className: "similar" }, el("p", { textContent: "Most similar" }), list);
    const shown = card.querySelector(".similar");
    if (shown) shown.replaceWith(section); else card.lastChild.append(section);
  }
}

async function inParallel(items, job) {
  const queue = [...items];
  const worker = async () => {
    for (let item = queue.shift(); item; item = queue.shift()) await job(item);
  };
  await Promise.all(Array.from({ length: MAX_PARALLEL_UPLOADS }, worker));
}

async function classifyAll(sources) {
  const cards = [...sources].map((source) => {
    const card = resultCard(source);
    $("results").prepend(card);
    return card;
  });
  await inParallel(cards, classify);
}

function setUpHeatmaps() {
  const toggle = $("heatmap");
  const slider = $("heatmap-opacity");
  toggle.addEventListener("change", () => {
    $("results").classList.toggle("heatmaps", toggle.checked);
    if (toggle.checked) inParallel(document.querySelectorAll("#results .card.ok"), explain);
  });
  slider.addEventListener("input", () => {
    $("results").style.setProperty("--heatmap-opacity", String(slider.value / 100));
    $("heatmap-opacity-value").textContent = `${slider.value}%`;
  });
}

function setUpUploads() {
  const input = $("files");
  input.addEventListener("change", () => {
    classifyAll(input.files);
    input.value = "";
  });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    classifyAll(event.dataTransfer.files);
  });
}

// Shown where the server fetches images by URL (/v1/models says so).
function setUpUrls() {
  const input = $("image-url");
  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    classifyAll([input.value.trim()]);
    input.value = "";
  });
}

// ---- model card ----------------------------------------------------------------------------

// The model versions being served (/v1/models) fill the picker; "" is the server's default, not
// offered when there is none (several models served, each request names one).
function chosenModel(choice = $("model-choice").value) {
  const [model, version] = choice.split("@");
  return model ? { model, version } : {};
}

function fillPicker(listing) {
  const picker = $("model-choice");
  const chosen = picker.value;
  const options = listing.models.map((m) =>
    el("option", { value: `${m.name}@${m.version}`, textContent: `${m.name}, version ${m.version}` }));
  const unnamed = picker.options[0];
  unnamed.disabled = unnamed.hidden = listing.default_model === null;
  picker.replaceChildren(unnamed, ...options);
  const fallback = unnamed.disabled && options.length ? options[0].value : "";
  picker.value = options.some((o) => o.value === chosen) ? chosen : fallback;
}

// "1-3, 8" for [1, 2, 3, 8].
function sizeRanges(sizes) {
  const runs = [];
  for (const size of sizes) {
    const last = runs.at(-1);
    if (last && size === last[1] + 1) last[1] = size; else runs.push([size, size]);
  }
  return runs.map(([first, last]) => (first === last ? `${first}` : `${first}-${last}`)).join(", ");
}

// The runtime that serves (two: each for some batch sizes), and what the backend setting
// measured of the others.
function runtime(model) {
  const others = model.backend.candidates.filter((c) => !c.chosen).map((c) =>
    c.skipped ? `${c.backend} ${c.precision}: skipped` : `${c.backend} ${c.precision} ${c.images_per_s} img/s`);
  const chosen = model.backend.candidates.filter((c) => c.chosen);
  let main = `${model.backend.name} on ${model.provider}`;
  if (chosen.length > 1) {
    main += ` (${chosen.map((c) => `${c.backend} ${c.precision} for batches of ${sizeRanges(c.batch_sizes)}`).join(", ")})`;
  } else if (chosen.length && chosen[0].images_per_s) {
    main += `, ${chosen[0].images_per_s} img/s timed`;
  }
  return others.length ? `${main} (also tried: ${others.join("; ")})` : main;
}

// "canary of version 2 (20%) against 1: running, 412 compared, 99.8% agree".
function rolloutLine(r) {
  const share = r.mode === "canary" ? ` (${r.percent}%${r.sticky ? ", sticky" : ""})` : "";
  const agree = r.agreement === null ? "" : `, ${(r.agreement * 100).toFixed(1)}% agree`;
  const status = r.status.replace("_", " ");
  const why = r.reason ? `: ${r.reason}` : "";
  return `${r.mode} of version ${r.candidate}${share} against ${r.baseline}: ${status}${why}; ` +
    `${r.compared} compared${agree}`;
}

// The measured top-1 with its 95% interval where the file has one (files exported before the
// interval have none), and a word on how rough a figure from few images is.
function accuracyText(accuracy) {
  const percent = (share) => `${(share * 100).toFixed(1)}%`;
  let text = `${percent(accuracy.top1)} top-1 on ${accuracy.images} images (${accuracy.dataset})`;
  if (accuracy.top1_ci95) {
    const [low, high] = accuracy.top1_ci95;
    text += `, 95% interval ${percent(low)}-${percent(high)}`;
  }
  if (accuracy.images < 100) text += ": few images, a rough figure";
  return text;
}

async function loadModelCard() {
  const card = $("model-card");
  let model;
  try {
    const listed = await fetch("/v1/models", { headers: authHeaders() });
    if (!listed.ok) throw new Error(`HTTP ${listed.status}`);
    const listing = await listed.json();
    fillPicker(listing);
    $("url-form").hidden = !listing.images_by_url;
    const query = new URLSearchParams(chosenModel());
    const response = await fetch(`/v1/model?${query}`, { headers: authHeaders() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    model = await response.json();
  } catch (error) {
    card.replaceChildren(el("dt", { textContent: "Status" }),
      el("dd", { textContent: `not available yet (${error.message}); retrying` }));
    setTimeout(loadModelCard, 2000);
    return;
  }
  const accuracy = model.accuracy ? accuracyText(model.accuracy) : "not measured";
  const [, height, width] = model.input.shape;
  const rows = [
    ["Name", model.name], ["Version", model.version], ["Build", model.build],
    ["Architecture", model.architecture],
    ["Precision", model.precision === model.file_precision
      ? model.precision : `${model.precision} (an ${model.file_precision} file)`],
    ["Runtime", runtime(model)], ["Accuracy", accuracy],
    ["Classes", String(model.num_classes)], ["Input", `${height}×${width} RGB`],
    ["Batch", model.batching.batch_limit === model.batching.max_batch_size
      ? `up to ${model.batching.max_batch_size}`
      : `up to ${model.batching.batch_limit} (fitted; max ${model.batching.max_batch_size})`],
  ];
  if (model.rollout) rows.push(["Rollout", rolloutLine(model.rollout)]);
  card.replaceChildren(...rows.flatMap(([term, value]) =>
    [el("dt", { textContent: term }), el("dd", { textContent: value })]));
  $("top-k").max = String(model.num_classes);
  maxBatch = model.batching.batch_limit;
}

// ---- live panel ----------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = value;
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

function pick(samples, name, labels = {}) {
  return samples.filter((s) => s.name === name &&
    Object.entries(labels).every(([key, value]) => s.labels[key] === value));
}

function buckets(samples, name, labels = {}) {
  // Cumulative counts by upper bound, ascending, +Inf last, summed over the other labels
  // (every model version's batches together).
  const byBound = new Map();
  for (const s of pick(samples, `${name}_bucket`, labels)) {
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byBound.set(le, (byBound.get(le) || 0) + s.value);
  }
  return [...byBound].map(([le, count]) => ({ le, count })).sort((a, b) => a.le - b.le);
}

function subtract(now, before) {
  if (!before) return now;
  return now.map((b, i) => ({ le: b.le, count: b.count - (before[i] ? before[i].count : 0) }));
}

function quantile(q, cumulative) {
  // As Prometheus' histogram_quantile: linear inside the bucket that holds the rank.
  const total = cumulative.length ? cumulative[cumulative.length - 1].count : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const { le, count } of cumulative) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return lower + (le - lower) * ((rank - below) / Math.max(count - below, 1e-9));
    }
    lower = le;
    below = count;
  }
  return lower;
}

function snapshot(samples) {
  const sum = (name) => pick(samples, name).reduce((acc, s) => acc + s.value, 0);
  return {
    at: performance.now(),
    images: sum("resnet_serve_images_total"),
    latency: buckets(samples, "resnet_serve_request_duration_seconds", { endpoint: "/predict" }),
    batches: buckets(samples, "resnet_serve_batch_size"),
    queue: sum("resnet_serve_queue_depth"),
    inflight: sum("resnet_serve_requests_in_flight"),
  };
}

function render(now) {
  history.push(now);
  while (history.length > 2 && now.at - history[1].at >= LIVE_WINDOW_MS) history.shift();
  const old = history.length > 1 ? history[0] : null;
  const seconds = old ? (now.at - old.at) / 1000 : 0;
  const recent = subtract(now.latency, old && old.latency);
  const active = recent.length && recent[recent.length - 1].count > 0;
  $("live-throughput").textContent = old ? ((now.images - old.images) / seconds).toFixed(1) : "–";
  $("live-p50").textContent = active ? formatMs(quantile(0.5, recent)) : "idle";
  $("live-p99").textContent = active ? formatMs(quantile(0.99, recent)) : "idle";
  $("live-queue").textContent = String(now.queue);
  $("live-inflight").textContent = String(now.inflight);

  let batches = subtract(now.batches, old && old.batches);
  let scope = `(last ${Math.round(seconds)} s)`;
  if (!batches.length || batches[batches.length - 1].count <= 0) {
    batches = now.batches;
    scope = "(since start)";
  }
  const counts = batches.map((b, i) => ({ le: b.le, n: b.count - (i ? batches[i - 1].count : 0) }));
  const total = counts.reduce((acc, c) => acc + c.n, 0);
  // Buckets up to the one holding the batch limit: larger batches cannot happen.
  const shown = counts.filter((c, i) => c.le !== Infinity && (i === 0 || counts[i - 1].le < maxBatch));
  const rows = shown.map((c, i) => ({
    name: i ? `${shown[i - 1].le + 1}–${c.le}`.replace(/^(\d+)–\1$/, "$1") : `${c.le}`,
    fraction: total ? c.n / total : 0,
    text: String(c.n),
  }));
  $("batch-scope").textContent = scope;
  $("live-batches").replaceChildren(...Array.from(barList(rows).childNodes));
  $("live-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refreshLive() {
  try {
    const response = await fetch("/metrics", { headers: authHeaders() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(snapshot(parseMetrics(await response.text())));
  } catch (error) {
    $("live-status").textContent = `metrics unavailable (${error.message})`;
  }
  setTimeout(refreshLive, LIVE_REFRESH_MS);
}

setUpUploads();
setUpUrls();
setUpHeatmaps();
$("model-choice").addEventListener("change", () => {
  showModelNotes();
  loadModelCard();
});
loadModelCard();
refreshLive();
