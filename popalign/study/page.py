"""The rating page: one task at a time, two pictures side by side, left / right / tie by key, click or tap.

Text from the study (the question, the prompt) is only ever set with textContent, never parsed as HTML; the rater
id is the one value put into the HTML itself, escaped.
"""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Image study</title>
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font-family: system-ui, sans-serif; background: #f4f4f4; color: #1a1a1a; }
  main { max-width: 1100px; margin: 0 auto; padding: 12px; }
  #progress-text { font-size: 14px; color: #555; margin: 0 0 4px; }
  #progress { width: 100%; height: 8px; background: #ddd; border-radius: 4px; overflow: hidden; }
  #progress-bar { height: 100%; width: 0; background: #3b6fd8; }
  h1 { font-size: 20px; margin: 12px 0 4px; }
  #prompt { font-size: 16px; margin: 0 0 4px; padding: 8px; background: #fff; border-left: 4px solid #3b6fd8; }
  #hint { font-size: 13px; color: #555; margin: 0 0 8px; min-height: 1em; }
  #pair { display: flex; gap: 8px; }
  .side { flex: 1 1 0; min-width: 0; display: flex; flex-direction: column; gap: 6px; }
  .side img { width: 100%; height: auto; max-height: 70vh; object-fit: contain; background: #fff;
              image-rendering: pixelated; border: 3px solid transparent; cursor: pointer; }
  .side img:hover { border-color: #3b6fd8; }
  button { font-size: 16px; padding: 12px 8px; border: 1px solid #999; border-radius: 6px; background: #fff; cursor: pointer; }
  button:disabled { opacity: 0.5; }
  #tie-row { display: flex; justify-content: center; margin-top: 8px; }
  #tie { min-width: 40%; }
  #keys { font-size: 13px; color: #555; text-align: center; margin-top: 8px; }
  #done, #error { display: none; font-size: 18px; padding: 24px 8px; text-align: center; }
  #error { color: #a00; }
  @media (max-width: 600px) { h1 { font-size: 17px; } #keys { display: none; } button { padding: 14px 4px; } }
</style>
</head>
<body data-rater="__RATER__">
<main>
  <p id="progress-text">Loading...</p>
  <div id="progress"><div id="progress-bar"></div></div>
  <section id="task">
    <h1 id="question"></h1>
    <p id="prompt"></p>
    <p id="hint"></p>
    <div id="pair">
      <div class="side"><img id="left-image" alt="left picture"><button id="left">Left</button></div>
      <div class="side"><img id="right-image" alt="right picture"><button id="right">Right</button></div>
    </div>
    <div id="tie-row"><button id="tie">Tie: about the same</button></div>
    <p id="keys">Keys: left arrow or A = left, right arrow or L = right, down arrow or T = tie</p>
  </section>
  <p id="done">All tasks are done. Thank you!</p>
  <p id="error"></p>
</main>
<script>
"use strict";
const rater = document.body.dataset.rater;
const api = "/api/raters/" + encodeURIComponent(rater);
let current = null;
let shownAt = 0;
let busy = false;

function setBusy(value) {
  busy = value;
  for (const id of ["left", "right", "tie"]) document.getElementById(id).disabled = value;
}

function showError(text) {
  const error = document.getElementById("error");
  error.textContent = text;
  error.style.display = "block";
}

function imageLoaded(image) {
  return image.complete ? Promise.resolve() : new Promise(resolve => { image.onload = resolve; image.onerror = resolve; });
}

async function load() {
  setBusy(true);
  let response;
  try { response = await fetch(api + "/next", {cache: "no-store"}); } catch (e) { showError("The server cannot be reached; reload the page to try again."); return; }
  if (!response.ok) { showError("This link does not work (" + response.status + ")."); return; }
  const task = await response.json();
  const total = task.total;
  document.getElementById("progress-text").textContent = (task.done ? total : task.answered) + " of " + total + " done";
  document.getElementById("progress-bar").style.width = (100 * task.answered / Math.max(1, total)) + "%";
  if (task.done) {
    document.getElementById("task").style.display = "none";
    document.getElementById("done").style.display = "block";
    current = null;
    return;
  }
  current = task;
  document.getElementById("question").textContent = task.question;
  document.getElementById("prompt").textContent = task.prompt;
  document.getElementById("hint").textContent = task.grid ? "Each picture shows " + task.grid + " images drawn for this text." : "";
  const left = document.getElementById("left-image");
  const right = document.getElementById("right-image");
  left.src = task.left;
  right.src = task.right;
  await Promise.all([imageLoaded(left), imageLoaded(right)]);
  shownAt = performance.now();
  setBusy(false);
}

async function vote(choice) {
  if (busy || current === null) return;
  setBusy(true);
  const waited = Math.min(Math.round(performance.now() - shownAt), 24 * 3600 * 1000);  // a tab left open for days
  const body = {position: current.position, choice: choice, time_ms: waited};
  try {
    const response = await fetch(api + "/votes", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify(body)});
    if (!response.ok) { showError("The vote was not stored (" + response.status + "); reload the page."); return; }
  } catch (e) { showError("The server cannot be reached; reload the page to try again."); return; }
  await load();
}

document.getElementById("left").addEventListener("click", () => vote("left"));
document.getElementById("right").addEventListener("click", () => vote("right"));
document.getElementById("tie").addEventListener("click", () => vote("tie"));
document.getElementById("left-image").addEventListener("click", () => vote("left"));
document.getElementById("right-image").addEventListener("click", () => vote("right"));
document.addEventListener("keydown", event => {
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  const key = event.key.toLowerCase();
  const choice = {"arrowleft": "left", "a": "left", "1": "left", "arrowright": "right", "l": "right", "2": "right",
                  "arrowdown": "tie", "t": "tie", "3": "tie"}[key];
  if (choice) { event.preventDefault(); vote(choice); }
});
load();
</script>
</body>
</html>
"""

_WELCOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Image study</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 2em auto; padding: 0 12px">
<h1>Image study</h1><p>Open the link you were given (it ends with your rater id).</p></body></html>
"""


def rating_page(rater_id: str) -> str:
    return _PAGE.replace("__RATER__", html.escape(rater_id, quote=True))


def welcome_page() -> str:
    return _WELCOME
