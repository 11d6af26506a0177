// xmr search page: plain JS, no build step, no third-party code; talks only to this server's /api.
//
// API key: when one is saved, every API call sends it in the X-API-Key header, and images are
// fetched as blobs with that header (so the key never appears in URLs, logs or the history).
// Without a key, <img> elements load thumbnails directly, which lets the browser cache them.
"use strict";

(() => {
  const KEY_STORAGE = "xmr.apiKey";
  const DEBOUNCE_MS = 300;
  const $ = (id) => document.getElementById(id);

  const state = {
    key: readKey(),
    health: null,
    file: null, // the example image (a File)
    previewUrl: null,
    controller: null, // aborts the previous query when a new one starts
    seq: 0,
    lastQuery: null, // re-run when k changes
    blobUrls: [],
    current: null, // result shown in the lightbox
    kChosen: false, // the person picked k: later health reloads keep it
    live: [], // debounced searches (typing)
  };

  function readKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
  }

  function authHeaders(extra = {}) {
    return state.key ? { ...extra, "X-API-Key": state.key } : extra;
  }

  class ApiError extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }

  // fetch + uniform error handling: the server answers {"error": {"code", "message"}}.
  async function api(path, { method = "GET", json, form, signal } = {}) {
    const init = { method, signal, headers: authHeaders() };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (form) {
      init.body = form;
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError("Cannot reach the search server. Is it still running?", 0, "network");
    }
    if (!res.ok) {
      let message = `The server answered ${res.status} ${res.statusText}`;
      let code = "http_error";
      try {
        const body = await res.json();
        if (body && body.error) { message = body.error.message; code = body.error.code; }
      } catch { /* not JSON: keep the status line */ }
      throw new ApiError(message, res.status, code);
    }
    return res.json();
  }

  // ---------------------------------------------------------------------------------------------
  // Errors and status
  // ---------------------------------------------------------------------------------------------
  function showError(err) {
    let text = err.message || String(err);
    if (!/[.!?]$/.test(text)) text += ".";
    if (err.status === 401) {
      text += " Enter the key under “API key” (top right).";
      $("key-panel").open = true;
      $("api-key").focus();
    }
    $("error-text").textContent = text;
    $("error-banner").hidden = false;
  }

  function clearError() { $("error-banner").hidden = true; }

  async function loadHealth() {
    try {
      const h = await api("api/health");
      state.health = h;
      const auth = h.auth_required ? (state.key ? " · key set" : " · API key required") : "";
      $("status-line").textContent = `${h.count.toLocaleString()} images · model ${h.model_id}${auth}`;
      limitKOptions(h.limits.max_k, h.limits.default_k);
      $("q").maxLength = h.limits.max_text_chars;
      $("modify").maxLength = h.limits.max_text_chars;
      if (h.auth_required && !state.key) $("key-panel").open = true;
      $("refine-label").hidden = !(h.rerank_depth > 0);
      updateComposedUi();
    } catch (err) {
      $("status-line").textContent = "Server unreachable";
      showError(err);
    }
  }

  // Offer the usual k values up to the server's max_k; start at its default_k, then keep the choice.
  function limitKOptions(maxK, defaultK) {
    const select = $("k");
    const chosen = state.kChosen ? Number(select.value) : defaultK;
    const values = [...new Set([5, 10, 20, 50, 100, defaultK, maxK])].filter((v) => v <= maxK);
    values.sort((a, b) => a - b);
    select.replaceChildren(...values.map((v) => new Option(String(v), String(v))));
    select.value = String(values.includes(chosen) ? chosen : defaultK);
  }

  function updateComposedUi() {
    const supported = !state.health || state.health.supports_composed;
    const note = $("composed-note");
    $("modify").disabled = !state.file || !supported;
    if (!supported) {
      note.textContent = "This model cannot combine an image with a modifying text: search by text or " +
        "by image, or serve a composed-retrieval model.";
      note.hidden = false;
    } else {
      note.textContent = state.file ? "" : "Add an example image first.";
      note.hidden = Boolean(state.file);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Queries
  // ---------------------------------------------------------------------------------------------
  function k() { return Number($("k").value) || 10; }

  // The refine switch only exists for methods with a second stage; unchecked sends refine=false.
  function refineOff() { return !$("refine-label").hidden && !$("refine").checked; }
  function withRefine(json) { return refineOff() ? { ...json, refine: false } : json; }

  const queries = {
    text: (text) => ({ path: "api/search/text", json: withRefine({ text, k: k() }), label: `“${text}”` }),
    image: (file) => ({ path: "api/search/image", form: formWith(file), label: "your image" }),
    composed: (file, text) => ({ path: "api/search/composed", form: formWith(file, text),
                                 label: `your image, modified: “${text}”` }),
    similar: (result) => ({ path: "api/search/similar", json: withRefine({ id: result.id, k: k() }),
                            label: `images similar to ${result.path}` }),
  };

  function formWith(file, text) {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    if (text !== undefined) form.append("text", text);
    form.append("k", String(k()));
    if (refineOff()) form.append("refine", "false");
    return form;
  }

  // Run the newest query; answers to superseded queries are dropped.
  async function run(makeQuery) {
    state.lastQuery = makeQuery;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const seq = ++state.seq;
    const query = makeQuery();
    $("results").setAttribute("aria-busy", "true");
    $("summary").textContent = `Searching ${query.label}…`;
    try {
      const body = await api(query.path, { method: "POST", json: query.json, form: query.form,
                                           signal: controller.signal });
      if (seq !== state.seq) return;
      clearError();
      render(body, query.label);
    } catch (err) {
      if (err.name === "AbortError" || seq !== state.seq) return;
      $("summary").textContent = "";
      showError(err);
    } finally {
      if (seq === state.seq) $("results").removeAttribute("aria-busy");
    }
  }

  function searchTextNow() {
    const text = $("q").value.trim();
    if (text) run(() => queries.text(text));
  }

  function searchImageNow() {
    if (!state.file) return;
    const file = state.file;
    const text = $("modify").value.trim();
    const composed = text && !$("modify").disabled;
    run(composed ? () => queries.composed(file, text) : () => queries.image(file));
  }

  // A debounced fn, with .now() to run at once (Enter) and drop the pending call, which would
  // otherwise fire later and replace newer results.
  function debounce(fn, ms) {
    let timer = null;
    const debounced = (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
    debounced.cancel = () => clearTimeout(timer);
    debounced.now = (...args) => { cancelLive(); fn(...args); };
    state.live.push(debounced);
    return debounced;
  }

  // Explicit actions (Enter, upload, "Similar") win over searches still waiting for typing to pause.
  function cancelLive() { for (const d of state.live) d.cancel(); }

  // ---------------------------------------------------------------------------------------------
  // Results
  // ---------------------------------------------------------------------------------------------
  function releaseBlobs() {
    for (const url of state.blobUrls) URL.revokeObjectURL(url);
    state.blobUrls = [];
  }

  // Direct URL without a key; with a key, fetch with the header and show a blob URL.
  async function setImage(img, url) {
    if (!state.key) { img.src = url; return; }
    try {
      const res = await fetch(url, { headers: authHeaders() });
      if (!res.ok) throw new ApiError(`image ${url}: ${res.status}`, res.status);
      const blobUrl = URL.createObjectURL(await res.blob());
      state.blobUrls.push(blobUrl);
      img.src = blobUrl;
    } catch {
      img.alt = `${img.alt} (could not load)`;
      img.classList.add("broken");
    }
  }

  function render(body, label) {
    releaseBlobs();
    const list = $("results");
    list.replaceChildren(...body.results.map(resultItem));
    const n = body.results.length;
    $("summary").textContent = n
      ? `${n} result${n === 1 ? "" : "s"} for ${label} · ${Math.round(body.took_ms)} ms`
      : `No results for ${label}.`;
  }

  function resultItem(result, index) {
    const li = document.createElement("li");
    li.className = "result";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "thumb";
    open.setAttribute("aria-label", `Enlarge result ${index + 1}: ${result.path}`);
    const img = document.createElement("img");
    img.alt = `Result ${index + 1}: ${result.path}`;
    img.loading = "lazy";
    img.decoding = "async";
    setImage(img, result.thumbnail_url);
    open.append(img);
    open.addEventListener("click", () => openLightbox(result, index));

    const caption = document.createElement("div");
    caption.className = "caption";
    const rank = textEl("span", "rank", `#${index + 1}`);
    const score = textEl("span", "score", result.score.toFixed(3));
    score.title = scoreTitle(result);
    const similar = document.createElement("button");
    similar.type = "button";
    similar.className = "link-button";
    similar.textContent = "Similar";
    similar.setAttribute("aria-label", `Find images similar to result ${index + 1}`);
    similar.addEventListener("click", () => { cancelLive(); run(() => queries.similar(result)); });
    caption.append(rank, score, similar);
    const path = textEl("span", "path", result.path);
    path.title = result.path;
    li.append(open, caption, path);
    return li;
  }

  // Hover text of a score: the second stage's parts when the method reports them (MMRef, AsCL).
  function scoreTitle(result) {
    const lines = [`score ${result.score.toFixed(4)}`];
    if (result.initial_score != null) lines.push(`initial (stage 1) ${result.initial_score.toFixed(4)}`);
    if (result.reference_score != null) lines.push(`reference ${result.reference_score.toFixed(4)}`);
    for (const [name, value] of Object.entries(result.score_parts || {})) {
      if (name !== "initial_score" && name !== "reference_score") lines.push(`${name} ${value.toFixed(4)}`);
    }
    if (lines.length === 1) lines[0] = "similarity score";
    return lines.join("\n");
  }

  function textEl(tag, className, text) {
    const el = document.createElement(tag);
    el.className = className;
    el.textContent = text;
    return el;
  }

  // ---------------------------------------------------------------------------------------------
  // Lightbox (a native <dialog>: focus is trapped and Esc closes it)
  // ---------------------------------------------------------------------------------------------
  function openLightbox(result, index) {
    state.current = result;
    const img = $("lb-img");
    img.removeAttribute("src");
    img.alt = `Result ${index + 1}: ${result.path}`;
    setImage(img, result.image_url);
    $("lb-title").textContent = `Result #${index + 1}`;
    $("lb-path").textContent = result.path;
    $("lb-score").textContent = result.score.toFixed(4);
    const refined = result.initial_score != null && result.reference_score != null;
    for (const el of document.querySelectorAll(".lb-part")) el.hidden = !refined;
    $("lb-initial").textContent = refined ? result.initial_score.toFixed(4) : "";
    $("lb-reference").textContent = refined ? result.reference_score.toFixed(4) : "";
    $("lb-id").textContent = String(result.id);
    $("lightbox").showModal();
  }

  function closeLightbox() { if ($("lightbox").open) $("lightbox").close(); }

  // ---------------------------------------------------------------------------------------------
  // Example image: file input, drag and drop, paste
  // ---------------------------------------------------------------------------------------------
  function setFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(new ApiError(`“${file.name}” is not an image.`, 0));
      return;
    }
    const limit = state.health && state.health.limits.max_upload_bytes;
    if (limit && file.size > limit) {
      showError(new ApiError(`“${file.name}” is ${(file.size / 2 ** 20).toFixed(1)} MiB; ` +
                             `the server accepts up to ${(limit / 2 ** 20).toFixed(1)} MiB.`, 413));
      return;
    }
    state.file = file;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    $("preview-img").src = state.previewUrl;
    $("preview-name").textContent = file.name || "pasted image";
    $("preview").hidden = false;
    $("drop-zone").hidden = true;
    updateComposedUi();
    cancelLive();
    searchImageNow();
  }

  function removeFile() {
    state.file = null;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    $("preview-img").removeAttribute("src");
    $("preview").hidden = true;
    $("drop-zone").hidden = false;
    $("file").value = "";
    $("modify").value = "";
    updateComposedUi();
    $("file").focus();
  }

  function wireDropZone() {
    const zone = $("drop-zone");
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (e) => { e.preventDefault(); setFile(e.dataTransfer.files[0]); });
    // A file dropped next to the zone must not make the browser navigate away from the page.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
      if (item) setFile(item.getAsFile());
    });
  }

  // ---------------------------------------------------------------------------------------------
  // API key
  // ---------------------------------------------------------------------------------------------
  function saveKey(value) {
    state.key = value.trim();
    try {
      if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
      else localStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled: the key lasts for this page only */ }
    if (state.key) $("key-panel").open = false;
    clearError();
    loadHealth();
    if (state.lastQuery) run(state.lastQuery);
  }

  // ---------------------------------------------------------------------------------------------
  // Wiring
  // ---------------------------------------------------------------------------------------------
  function init() {
    $("api-key").value = state.key;
    $("key-form").addEventListener("submit", (e) => { e.preventDefault(); saveKey($("api-key").value); });
    $("key-clear").addEventListener("click", () => { $("api-key").value = ""; saveKey(""); });
    const liveText = debounce(searchTextNow, DEBOUNCE_MS);
    const liveModify = debounce(searchImageNow, DEBOUNCE_MS);
    $("text-form").addEventListener("submit", (e) => { e.preventDefault(); liveText.now(); });
    $("q").addEventListener("input", liveText);
    $("k").addEventListener("change", () => {
      state.kChosen = true;
      if (state.lastQuery) run(state.lastQuery);
    });
    $("file").addEventListener("change", () => setFile($("file").files[0]));
    $("remove-image").addEventListener("click", removeFile);
    $("modify").addEventListener("input", liveModify);
    $("modify").addEventListener("keydown", (e) => { if (e.key === "Enter") liveModify.now(); });
    $("error-close").addEventListener("click", clearError);
    $("lb-close").addEventListener("click", closeLightbox);
    $("lb-similar").addEventListener("click", () => {
      const result = state.current;
      closeLightbox();
      cancelLive();
      if (result) run(() => queries.similar(result));
    });
    // A click on the backdrop (outside the figure) closes the dialog.
    $("lightbox").addEventListener("click", (e) => { if (e.target === $("lightbox")) closeLightbox(); });
    wireDropZone();
    updateComposedUi();
    loadHealth();
    $("q").focus();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
