// The gallery page. Every piece of text from an output (prompts, metadata, file names) goes
// into the page through textContent or an attribute, never as HTML: a prompt is data.
"use strict";

const $ = (id) => document.getElementById(id);
const EDITABLE = ["prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "duration", "bars", "frames"];
const state = { items: [], signature: "", current: null, facets: { tasks: [], models: [] } };

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, options = {}) {
  const init = { ...options, headers: { ...(options.headers || {}) } };
  if (init.body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(init.body);
  }
  const response = await fetch(path, init);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.hint = body.hint;
    throw error;
  }
  return body;
}

function showError(error) {
  const box = $("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = "error: " + error.message + (error.hint ? "\nhint: " + error.hint : "");
  box.hidden = false;
}

// ---------------------------------------------------------------- the grid
function filters() {
  const params = new URLSearchParams();
  for (const [name, id] of [["q", "filter-q"], ["task", "filter-task"], ["model", "filter-model"],
                            ["since", "filter-since"], ["until", "filter-until"]]) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  return params.toString();
}

async function refresh(force = false) {
  let data;
  try {
    data = await api("/api/gallery?" + filters());
  } catch (error) {
    showError(error);
    return;
  }
  const signature = JSON.stringify(data.items.map((i) => i.id)) + filters();
  updateFacets(data.facets);
  $("count").textContent = data.total + (data.total === 1 ? " output" : " outputs");
  if (!force && signature === state.signature) return;
  state.signature = signature;
  state.items = data.items;
  const grid = $("grid");
  grid.replaceChildren(...data.items.map(card));
}

function card(item) {
  const figure = el("figure", { class: "card kind-" + item.kind, "data-id": item.id, tabindex: "0" });
  const img = el("img", { src: item.thumb, alt: item.title, loading: "lazy" });
  const caption = el("figcaption");
  caption.append(el("span", { class: "prompt", title: item.title }, item.title),
                 el("span", { class: "meta", title: item.model }, [item.task, item.model_label, item.created.slice(0, 16).replace("T", " ")]
                   .filter(Boolean).join(" · ")));
  figure.append(img, caption);
  figure.addEventListener("click", () => openDetail(item.id));
  figure.addEventListener("keydown", (event) => { if (event.key === "Enter") openDetail(item.id); });
  return figure;
}

function updateFacets(facets) {
  for (const [id, values] of [["filter-task", facets.tasks], ["filter-model", facets.models]]) {
    const select = $(id);
    const known = Array.from(select.options).map((o) => o.value);
    for (const value of values) {
      if (!known.includes(value)) select.append(el("option", { value }, value));
    }
  }
}

// ---------------------------------------------------------------- the detail view
async function openDetail(id) {
  let item;
  try {
    item = await api("/api/gallery/" + encodeURIComponent(id));
  } catch (error) {
    showError(error);
    return;
  }
  state.current = item;
  $("detail-title").textContent = item.title;
  const media = $("detail-media");
  media.replaceChildren();
  if (item.kind === "image" || (item.kind === "video" && item.name.endsWith(".gif"))) {
    media.append(el("img", { src: item.file, alt: item.prompt || item.name }));
  } else if (item.kind === "video") {
    media.append(el("video", { src: item.file, controls: "", loop: "", preload: "metadata" }));
  } else if (item.kind === "audio") {
    media.append(el("img", { src: item.thumb, alt: "waveform", class: "wave" }),
                 el("audio", { src: item.file, controls: "", preload: "metadata" }));
  } else if (item.kind === "midi") {
    media.append(el("img", { src: item.thumb, alt: "piano roll", class: "wave" }));
    if (item.companions.render) {
      media.append(el("audio", { src: item.companions.render, controls: "", preload: "metadata" }));
    }
    media.append(el("a", { href: item.file, download: item.name }, "download " + item.name));
  } else {
    media.append(el("img", { src: item.thumb, alt: item.name }), el("a", { href: item.file, download: item.name }, item.name));
  }
  for (const [name, url] of Object.entries(item.companions)) {
    if (name !== "render") media.append(el("a", { href: url, class: "companion" }, name));
  }
  $("detail-command").textContent = item.command;
  $("copied").hidden = true;
  $("detail-meta").textContent = JSON.stringify(item.metadata && Object.keys(item.metadata).length ? item.metadata : item.params, null, 2);
  againForm(item);
  $("again-progress").replaceChildren();
  const dialog = $("detail");
  if (!dialog.open) dialog.showModal();
}

function againForm(item) {
  const fields = $("again-fields");
  fields.replaceChildren();
  const extra = {};
  for (const [name, value] of Object.entries(item.params)) {
    if (name === "seeds" || name === "num_outputs") continue;
    if (EDITABLE.includes(name)) {
      const input = name === "prompt" || name === "negative_prompt"
        ? el("textarea", { name, rows: "2" })
        : el("input", { name, type: typeof value === "number" ? "number" : "text", step: "any" });
      input.value = value === null ? "" : String(value);
      input.dataset.kind = typeof value;
      const label = el("label", { class: name.endsWith("prompt") ? "wide" : "" }, name.replace("_", " "));
      label.append(input);
      fields.append(label);
    } else if (value !== null && !(Array.isArray(value) && value.length === 0)) {
      extra[name] = value;
    }
  }
  $("again-extra").value = JSON.stringify(extra, null, 1);
}

function againParams() {
  let params = {};
  const text = $("again-extra").value.trim();
  if (text) params = JSON.parse(text);
  for (const input of $("again-fields").querySelectorAll("input, textarea")) {
    const raw = input.value.trim();
    if (raw === "") continue;
    params[input.name] = input.dataset.kind === "number" ? Number(raw) : raw;
  }
  return params;
}

// ---------------------------------------------------------------- jobs and their progress
async function submitJob(task, params, options, where) {
  showError(null);
  let job;
  try {
    job = await api("/api/jobs", { method: "POST", body: { task, params, options } });
  } catch (error) {
    showError(error);
    return null;
  }
  follow(job, where);
  return job;
}

function follow(job, where) {
  const row = el("div", { class: "job", "data-job": job.id });
  const label = el("span", { class: "job-label" }, job.task + ": " + (job.request.prompt || job.id));
  const bar = el("progress", { max: "1", value: "0" });
  const status = el("span", { class: "job-status" }, "queued");
  const cancel = el("button", { type: "button", class: "job-cancel" }, "Cancel");
  cancel.addEventListener("click", () => api("/api/jobs/" + job.id + "/cancel", { method: "POST" }).catch(showError));
  row.append(label, bar, status, cancel);
  where.prepend(row);
  const events = new EventSource("/api/jobs/" + job.id + "/events");
  const finish = (text, cls) => {
    events.close();
    status.textContent = text;
    row.classList.add(cls);
    cancel.remove();
    refresh(true);
  };
  events.addEventListener("started", () => { status.textContent = "running"; });
  events.addEventListener("status", (e) => { status.textContent = JSON.parse(e.data).text; });
  events.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data);
    if (data.total) { bar.max = data.total; bar.value = data.completed; }
    status.textContent = data.description + " " + data.completed + (data.total ? "/" + data.total : "");
  });
  events.addEventListener("output", () => refresh(true));
  events.addEventListener("done", (e) => finish("done: " + JSON.parse(e.data).outputs + " output(s)", "done"));
  events.addEventListener("failed", (e) => {
    const data = JSON.parse(e.data);
    finish("failed: " + data.message + (data.hint ? " (" + data.hint + ")" : ""), "failed");
  });
  events.addEventListener("cancelled", () => finish("cancelled", "cancelled"));
}

// ---------------------------------------------------------------- wiring
function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

document.addEventListener("DOMContentLoaded", () => {
  const onFilter = debounce(() => refresh(true), 200);
  for (const id of ["filter-q", "filter-task", "filter-model", "filter-since", "filter-until"]) {
    $(id).addEventListener("input", onFilter);
    $(id).addEventListener("change", onFilter);
  }
  $("new-job").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = {};
    const prompt = $("new-prompt").value.trim();
    if (prompt) params.prompt = prompt;
    if ($("new-model").value.trim()) params.model = $("new-model").value.trim();
    if ($("new-steps").value) params.steps = Number($("new-steps").value);
    submitJob($("new-task").value, params, {}, $("jobs"));
  });
  $("again").addEventListener("submit", (event) => {
    event.preventDefault();
    let params;
    try {
      params = againParams();
    } catch (error) {
      showError(new Error("the other parameters are not valid JSON: " + error.message));
      return;
    }
    const item = state.current;
    const model = item.metadata && item.metadata.model ? (item.metadata.model.alias || item.metadata.model.source) : null;
    if (model) params.model = model;
    submitJob(item.task, params, { out: item.folder }, $("again-progress"));
  });
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail-copy").addEventListener("click", async () => {
    const text = $("detail-command").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) {  // no clipboard permission (plain http off localhost): select it for Ctrl-C
      const range = document.createRange();
      range.selectNodeContents($("detail-command"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }
    $("copied").hidden = false;
  });
  refresh(true);
  // folders the CLI writes while the page is open: look again every few seconds
  setInterval(() => { if (!document.hidden) refresh(false); }, 4000);
});
