// The omni playground: a form built from the model card (GET /omni/playground/config.json), requests
// through the public routes, the answer's images / video and its `omni` block shown. No framework, no
// build step, nothing fetched from outside the server.
"use strict";

// Request fields the form can offer, in form order; a model's card says which of them it honours.
const FIELD_INPUTS = [
  ["width", "Width", "int"], ["height", "Height", "int"],
  ["num_inference_steps", "Steps", "int"], ["seed", "Seed", "int"],
  ["guidance_scale", "Guidance scale", "float"], ["true_cfg_scale", "True CFG scale", "float"],
  ["guidance_scale_2", "Guidance scale 2", "float"], ["num_frames", "Frames", "int"], ["fps", "FPS", "int"],
  ["num_outputs_per_prompt", "Images (n)", "int"], ["negative_prompt", "Negative prompt", "str"],
];
const KNOB_TYPES = { int: "int", float: "float", bool: "bool", str: "str" };
const $ = (id) => document.getElementById(id);
let card = null;

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function addInput(name, label, type) {
  const wrap = document.createElement("label");
  wrap.textContent = label + " ";
  const input = document.createElement("input");
  input.id = "field-" + name;
  input.dataset.field = name;
  input.dataset.type = type;
  input.placeholder = "server default";
  if (type === "int" || type === "float") {
    input.type = "number";
    input.step = type === "int" ? "1" : "any";
  }
  if (type === "bool") input.placeholder = "true / false";
  wrap.appendChild(input);
  $("fields").appendChild(wrap);
}

function buildForm(config) {
  card = config;
  const caps = config.capabilities;
  const honoured = new Set(caps.fields);
  $("model-card").textContent = `${config.model} -- ${config.family}, makes ${config.output}` +
    (caps.input_images.max ? `, takes ${caps.input_images.min}-${caps.input_images.max ?? "any"} input image(s)` : "");
  for (const [name, label, type] of FIELD_INPUTS) if (honoured.has(name)) addInput(name, label, type);
  for (const [name, type] of Object.entries(caps.knobs)) addInput(name, name, KNOB_TYPES[type] || "json");
  // a family that declares a partial-image decoder streams (stream + partial_images)
  if (caps.partial_images) $("stream-row").hidden = false;
  if (caps.input_images.max !== 0) {
    $("upload-row").hidden = false;
    $("upload-label").textContent = caps.input_images.min > 0 ? "Input image (required)" : "Input image (optional)";
    $("upload").required = caps.input_images.min > 0;
  }
  $("generate").textContent = config.output === "video" ? "Generate video" : "Generate";
  const key = localStorage.getItem("omni-playground-api-key");
  if (key) $("api-key").value = key;
}

// The form's fields as request fields (empty inputs are left out: the server's defaults apply).
function requestFields() {
  const fields = { model: card.model, prompt: $("prompt").value };
  for (const input of document.querySelectorAll("#fields input")) {
    const raw = input.value.trim();
    if (raw === "") continue;
    const type = input.dataset.type;
    let value = raw;
    if (type === "int") value = parseInt(raw, 10);
    else if (type === "float") value = parseFloat(raw);
    else if (type === "bool") value = raw === "true";
    else if (type === "json") value = JSON.parse(raw);
    fields[input.dataset.field] = value;
  }
  // OpenAI's wire names: size = "WIDTHxHEIGHT", n = images per request
  if ("width" in fields || "height" in fields) {
    if (!("width" in fields && "height" in fields)) throw new Error("set both width and height, or neither");
    fields.size = `${fields.width}x${fields.height}`;
    delete fields.width;
    delete fields.height;
  }
  if ("num_outputs_per_prompt" in fields) {
    fields.n = fields.num_outputs_per_prompt;
    delete fields.num_outputs_per_prompt;
  }
  return fields;
}

function asForm(fields, fileField, file) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.append(k, typeof v === "string" ? v : JSON.stringify(v));
  form.append(fileField, file, file.name);
  return form;
}

async function call(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (!r.ok) {
    let message = `HTTP ${r.status}`;
    try {
      const err = (await r.json()).error;
      message += `: ${err.message}` + (err.param ? ` (${err.param})` : "");
    } catch (e) { /* not an OpenAI error body */ }
    throw new Error(message);
  }
  return r;
}

function showResolved(omni) {
  $("resolved").textContent = JSON.stringify(omni, null, 2);
}

// Image `index` of the answer: made on first sight, replaced by each later partial / the final one.
function showImage(index, format, b64, kind) {
  let img = $("result-" + index);
  if (!img) {
    img = document.createElement("img");
    img.id = "result-" + index;
    img.alt = `generated image ${index + 1}`;
    $("images").appendChild(img);
  }
  img.dataset.kind = kind;
  img.src = `data:image/${format || "png"};base64,${b64}`;
}

async function generateImages(fields, file) {
  const partials = $("stream-row").hidden ? "" : $("partials").value;
  if (partials !== "") return streamImages(fields, file, parseInt(partials, 10));
  const r = file
    ? await call("POST", "/v1/images/edits", asForm(fields, "image", file))
    : await call("POST", "/v1/images/generations", fields);
  const body = await r.json();
  body.data.forEach((d, i) => showImage(i, body.output_format, d.b64_json, "final"));
  showResolved(body.omni);
}

// Streaming: the same request with stream=true, read as server-sent events while it runs. Each
// partial image replaces the preview of its image; each completed event sets it for good and
// carries the answer's `omni` block. Events are OpenAI's (`image_generation.partial_image`,
// `image_generation.completed`; `image_edit.*` for edits); a failure mid-stream is an `error` event.
async function streamImages(fields, file, partials) {
  const body = { ...fields, stream: true, partial_images: partials };
  const r = file
    ? await call("POST", "/v1/images/edits", asForm(body, "image", file))
    : await call("POST", "/v1/images/generations", body);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let seen = 0;
  const onEvent = (event) => {
    if (event.error) throw new Error(event.error.message + (event.error.param ? ` (${event.error.param})` : ""));
    const type = event.type || "";
    if (type.endsWith(".partial_image")) {
      seen += 1;
      showImage(event.index ?? 0, event.output_format, event.b64_json, "partial");
      $("status").textContent = `partial image ${event.partial_image_index + 1} of ${partials}\u2026`;
    } else if (type.endsWith(".completed")) {
      showImage(event.index ?? 0, event.output_format, event.b64_json, "final");
      if (event.omni) showResolved(event.omni);
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("");
      buffer = buffer.slice(cut + 2);
      if (data.trim()) onEvent(JSON.parse(data));
    }
  }
  document.body.dataset.partials = String(seen);
}

async function generateVideo(fields, file) {
  const r = file
    ? await call("POST", "/v1/videos", asForm(fields, "input_reference", file))
    : await call("POST", "/v1/videos", fields);
  let job = await r.json();
  const bar = $("progress");
  bar.hidden = false;
  while (!["completed", "failed", "cancelled"].includes(job.status)) {
    bar.value = job.progress;
    $("status").textContent = `${job.status} ${job.progress}%`;
    await new Promise((done) => setTimeout(done, 500));
    job = await (await call("GET", `/v1/videos/${job.id}`)).json();
  }
  bar.value = job.progress;
  showResolved(job.omni);
  if (job.status !== "completed") throw new Error(`video ${job.id} ${job.status}: ${(job.error || {}).message || ""}`);
  const mp4 = await (await call("GET", `/v1/videos/${job.id}/content`)).blob();
  const video = $("video");
  video.src = URL.createObjectURL(mp4);
  video.dataset.videoId = job.id;
  video.hidden = false;
}

async function onGenerate(event) {
  event.preventDefault();
  const button = $("generate");
  $("error").hidden = true;
  $("images").replaceChildren();
  $("video").hidden = true;
  $("progress").hidden = true;
  $("resolved").textContent = "\u2014";
  delete document.body.dataset.partials;
  localStorage.setItem("omni-playground-api-key", $("api-key").value.trim());
  button.disabled = true;
  const started = performance.now();
  $("status").textContent = "generating\u2026";
  document.body.dataset.state = "running";
  try {
    const fields = requestFields();
    const file = $("upload").files[0];
    await (card.output === "video" ? generateVideo(fields, file) : generateImages(fields, file));
    $("status").textContent = `done in ${((performance.now() - started) / 1000).toFixed(2)} s`;
    document.body.dataset.state = "done";
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    $("status").textContent = "";
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false;
  }
}

async function init() {
  try {
    const r = await fetch("/omni/playground/config.json");
    buildForm(await r.json());
    $("form").addEventListener("submit", onGenerate);
    document.body.dataset.state = "ready";
  } catch (e) {
    $("model-card").textContent = "could not read the model card: " + e.message;
  }
}

init();
