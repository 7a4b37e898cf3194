// The page of `unigendet serve`: send one image to POST /detect?spectral_map=1 and show the answer.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function showError(message) {
  $("result").hidden = true;
  const error = $("error");
  error.textContent = message;
  error.hidden = false;
  setStatus("error", "The image was not scored.");
}

// A field the detector may not give (decision, stage, explanation): its row is hidden when absent.
function setOptional(rowId, cellId, value) {
  const present = value !== null && value !== undefined && value !== "";
  $(rowId).hidden = !present;
  $(cellId).textContent = present ? String(value) : "";
}

function render(record, file) {
  $("error").hidden = true;
  $("result-id").textContent = record.id;
  $("result-label").textContent = record.label;
  $("result-label").dataset.label = record.label;
  const pFake = $("result-p-fake");
  pFake.textContent = record.p_fake === null ? "n/a" : record.p_fake.toFixed(4);
  pFake.dataset.value = JSON.stringify(record.p_fake);
  setOptional("row-decision", "result-decision", record.decision);
  $("result-decision").dataset.decision = record.decision || "";
  setOptional("row-stage", "result-stage", record.stage_exited);
  setOptional("row-explanation", "result-explanation", record.explanation);
  const { spectral_map_png: png, ...shown } = record;
  $("result-json").textContent = JSON.stringify(shown, null, 2);
  $("spectral-map-figure").hidden = !png;
  if (png) {
    $("spectral-map").src = "data:image/png;base64," + png;
  } else {
    $("spectral-map").removeAttribute("src");
  }
  $("preview").src = URL.createObjectURL(file);
  $("result").hidden = false;
  setStatus("done", "Scored.");
}

async function upload(file) {
  setStatus("pending", "Scoring " + file.name + " …");
  const form = new FormData();
  form.append("files", file, file.name);
  let response, body;
  try {
    response = await fetch("/detect?spectral_map=1", { method: "POST", body: form });
    body = await response.json().catch(() => null);
  } catch (err) {
    showError("The service could not be reached: " + err);
    return;
  }
  if (!response.ok) {
    const message = body && body.message ? body.message : "HTTP " + response.status;
    showError("Rejected (" + response.status + "): " + message);
    return;
  }
  render(body.results[0], file);
}

function choose(files) {
  if (files && files.length > 0) {
    upload(files[0]);
  }
}

$("file-input").addEventListener("change", (event) => choose(event.target.files));
const zone = $("drop-zone");
["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (event) => {
  event.preventDefault();
  zone.classList.add("dragging");
}));
["dragleave", "drop"].forEach((name) => zone.addEventListener(name, () => zone.classList.remove("dragging")));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  choose(event.dataTransfer.files);
});

fetch("/info")
  .then((response) => response.json())
  .then((info) => { $("detector-name").textContent = info.detector; })
  .catch(() => { $("detector-name").textContent = "unavailable"; });
