// The reading-room page: pick an image, type a reason, stream the findings from /v1/chat/completions,
// then ask /v1/explain for each sentence's map: pointing at a sentence draws its map over the picture, leaving fades it.
"use strict";
const $ = (id) => document.getElementById(id);
let image = null; // {name, dataUrl}
let controller = null; // aborts the request in flight

function apiHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "the server answered " + response.status + " " + response.statusText;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showPicture(url) {
  $("preview").src = url;
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
}

// Browsers cannot show DICOM: the server renders what the model will see (or says why it cannot).
async function serverPreview(file) {
  $("preview").hidden = true;
  $("drop-hint").hidden = false;
  const response = await fetch("/v1/preview", { method: "POST", headers: apiHeaders({ "Content-Type": "application/octet-stream" }), body: file });
  if (!response.ok) { showError(await errorMessage(response)); return; }
  showPicture(URL.createObjectURL(await response.blob()));
}

function showPreview(file) {
  const isDicom = /\.dcm$/i.test(file.name) || file.type === "application/dicom";
  if (isDicom || !/^image\/(png|jpeg)$/.test(file.type)) return serverPreview(file);
  $("preview").onerror = () => serverPreview(file); // a broken PNG or JPEG: let the server say what is wrong
  showPicture(URL.createObjectURL(file));
}

function sizeText(bytes) {
  if (bytes < 1024) return bytes + " B";
  if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
  return (bytes / 1024 / 1024).toFixed(1) + " MiB";
}

function hideMap() {
  $("map").classList.remove("shown");
  $("map").removeAttribute("src");
}

async function pick(file) {
  if (!file) return;
  showError("");
  hideMap();
  image = { name: file.name, dataUrl: await readAsDataUrl(file) };
  $("file-name").textContent = file.name + " (" + sizeText(file.size) + ")";
  $("generate").disabled = false;
  showPreview(file);
}

// Server-sent events from a fetch body: yields each `data:` payload.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder(); // stream: true below keeps a character split across reads whole
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function generate() {
  if (!image) return;
  showError("");
  hideMap();
  $("findings").textContent = "";
  $("stats").textContent = "";
  $("explain-note").hidden = true;
  $("copy").disabled = true;
  $("generate").disabled = true;
  $("stop").hidden = false;
  controller = new AbortController();
  const content = [{ type: "image_url", image_url: { url: image.dataUrl } }];
  const reason = $("reason").value;
  if (reason.trim()) content.push({ type: "text", text: reason });
  const start = performance.now();
  let first = null, tokens = 0, complete = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal, headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: window.servedName, stream: true, stream_options: { include_usage: true }, messages: [{ role: "user", content }] }),
    });
    if (!response.ok) { showError(await errorMessage(response)); return; }
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) { showError(chunk.error.message); break; }
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (piece) {
        if (first === null) first = performance.now();
        $("findings").textContent += piece;
      }
    }
    const end = performance.now();
    complete = first !== null && !$("error").textContent;
    if (first !== null) {
      const rate = tokens > 1 && end > first ? ((tokens - 1) / ((end - first) / 1000)).toFixed(1) + " tokens/s" : "";
      $("stats").textContent = "time to first token " + ((first - start) / 1000).toFixed(2) + " s" + (rate ? " · " + rate : "") + " · " + tokens + " tokens";
    }
  } catch (e) {
    if (e.name !== "AbortError") showError("request failed: " + e.message);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").hidden = true;
    $("copy").disabled = !$("findings").textContent;
  }
  if (complete) await explainReport(image.dataUrl, reason, $("findings").textContent);
}

// Per-sentence maps of the finished report; dropped if another image or report took its place meanwhile.
// Each map is a transparent PNG of the picture's shape, laid over the picture in the same box.
async function explainReport(dataUrl, reason, findings) {
  $("explain-note").hidden = false;
  $("explain-status").textContent = "Computing the maps…";
  try {
    const response = await fetch("/v1/explain", {
      method: "POST", headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ image_url: dataUrl, reason: reason.trim() ? reason : null, findings }),
    });
    const current = () => image && image.dataUrl === dataUrl && $("findings").textContent === findings;
    if (!response.ok) { if (current()) $("explain-status").textContent = "No maps: " + await errorMessage(response); return; }
    const explanation = await response.json();
    if (!current()) return;
    showSentences(explanation);
    $("explain-status").textContent = "Point at a sentence to see its map.";
  } catch (e) {
    $("explain-status").textContent = "No maps: " + e.message;
  }
}

function showSentences(explanation) {
  const box = $("findings"), text = explanation.findings;
  box.textContent = "";
  let at = 0;
  for (const s of explanation.sentences) {
    box.append(text.slice(at, s.start));
    const span = document.createElement("span");
    span.className = "sentence";
    span.textContent = text.slice(s.start, s.end);
    span.addEventListener("mouseenter", () => { $("map").src = s.map; $("map").classList.add("shown"); });
    span.addEventListener("mouseleave", () => $("map").classList.remove("shown")); // fades (style.css)
    box.append(span);
    at = s.end;
  }
  box.append(text.slice(at));
}

async function init() {
  // The served name, and whether this server wants a key: /v1/models answers 401 without one.
  const response = await fetch("/v1/models", { headers: apiHeaders() });
  if (response.status === 401) { $("key-row").hidden = false; window.servedName = "llava-rad"; return; }
  const models = await response.json();
  window.servedName = models.data[0].id;
}

$("file").addEventListener("change", (e) => pick(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("copy").addEventListener("click", () => navigator.clipboard.writeText($("findings").textContent));
$("api-key").addEventListener("change", init);
init();
