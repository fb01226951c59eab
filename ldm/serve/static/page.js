// The page: fill the form from /api/model, post a request, follow its place in the queue and its steps,
// and add its images to the gallery (each a PNG that carries its parameters).
"use strict";

const POLL_MS = 250;
const $ = (id) => document.getElementById(id);

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text === undefined ? value : text;
  select.appendChild(o);
}

function showMessage(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

function showStatus(text, done, total) {
  $("status-text").textContent = text;
  const bar = $("progress");
  bar.hidden = total === undefined;
  if (total) { bar.max = total; bar.value = done; }
}

async function loadModel() {
  const info = await (await fetch("/api/model")).json();
  const source = info.source.run || info.source.checkpoint || "";
  $("model").textContent = source + (info.controlnet ? " (ControlNet)" : "");
  info.samplers.forEach((s) => option($("sampler"), s));
  $("sampler").value = info.defaults.sampler;
  $("steps").value = info.defaults.steps;
  $("steps").max = info.limits.max_steps;
  $("guidance").value = info.defaults.guidance;
  $("strength").placeholder = `${info.defaults.strength} (1 with a mask)`;  // empty: txt2img.py's default
  $("control-scale").value = info.defaults.control_scale;
  $("n").max = info.limits.max_images;
  for (const side of ["width", "height"]) {
    $(side).value = info.image_size;
    $(side).min = info.size_multiple;
    $(side).step = info.size_multiple;
    $(side).max = info.limits.max_side;
  }
  const classes = info.condition_key === "label";
  $("class-row").hidden = !classes;
  $("prompt-row").hidden = classes;
  $("negative-row").hidden = classes;
  info.class_names.forEach((name) => option($("class"), name));
  $("control-row").hidden = !info.controlnet;
  $("lora-row").hidden = info.loras.length === 0;
  info.loras.forEach((name) => option($("lora"), name));
}

function addImage(image) {
  const figure = document.createElement("figure");
  const link = document.createElement("a");
  link.href = image.url;
  link.download = image.name;
  link.title = "download the PNG (its parameters are inside)";
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = image.parameters.split("\n")[0];
  img.dataset.seed = image.seed;
  link.appendChild(img);
  const caption = document.createElement("figcaption");
  const save = document.createElement("a");
  save.href = image.url;
  save.download = image.name;
  save.textContent = `seed ${image.seed} · PNG`;
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "parameters";
  const parameters = document.createElement("pre");
  parameters.textContent = image.parameters;
  const command = document.createElement("code");
  command.textContent = image.command;
  details.append(summary, parameters, command);
  caption.append(save, details);
  figure.append(link, caption);
  $("gallery").prepend(figure);
}

async function follow(job) {
  for (;;) {
    const state = await (await fetch(`/api/jobs/${job}`)).json();
    if (state.state === "queued") {
      showStatus(state.position ? `queued: ${state.position} ahead` : "starting…", 0, 0);
    } else if (state.state === "running") {
      showStatus(`step ${state.step} of ${state.total || "…"}`, state.step, state.total || 1);
    } else if (state.state === "done") {
      state.images.slice().reverse().forEach(addImage);
      showStatus(`done: ${state.images.length} image(s)`);
      return;
    } else {
      showMessage(state.error || "the request failed");
      showStatus("");
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function submit(event) {
  event.preventDefault();
  showMessage("");
  $("generate").disabled = true;
  try {
    const response = await fetch("/api/generate", { method: "POST", body: new FormData($("request")) });
    const answer = await response.json();
    if (!response.ok) {
      showMessage(answer.error || `the server answered ${response.status}`);
      showStatus("");
      return;
    }
    await follow(answer.job);
  } catch (error) {
    showMessage(`no answer from the server: ${error}`);
  } finally {
    $("generate").disabled = false;
  }
}

$("request").addEventListener("submit", submit);
loadModel().catch((error) => showMessage(`cannot read the model's description: ${error}`));
