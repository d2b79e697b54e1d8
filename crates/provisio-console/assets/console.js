// Provisio console: copy buttons, the mechanism's fields, and a chart that refreshes.
// Everything works without this script; it only makes some steps shorter.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("button.copy[data-copy]")) {
    b.addEventListener("click", async () => {
      const el = document.getElementById(b.dataset.copy);
      if (!el) return;
      const text = ("value" in el && el.value !== undefined ? el.value : el.textContent).trim();
      try {
        await navigator.clipboard.writeText(text);
        b.textContent = "Copied";
      } catch (e) {
        // No clipboard (plain HTTP, or a denied permission): select it for the user.
        const range = document.createRange();
        range.selectNodeContents(el);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        b.textContent = "Selected";
      }
      setTimeout(() => { b.textContent = "Copy"; }, 2000);
    });
  }
  // Show only the fields of the chosen mechanism (all are shown without script).
  const radios = document.querySelectorAll("input[type=radio][data-shows]");
  const sync = () => {
    for (const r of radios) {
      for (const id of r.dataset.shows.split(" ")) {
        const el = document.getElementById(id);
        if (el) el.hidden = !r.checked;
      }
    }
    for (const r of radios) {
      if (r.checked) {
        for (const id of r.dataset.shows.split(" ")) {
          const el = document.getElementById(id);
          if (el) el.hidden = false;
        }
      }
    }
  };
  for (const r of radios) r.addEventListener("change", sync);
  if (radios.length) sync();
  // The chart reloads every 30 s.
  const chart = document.getElementById("chart");
  if (chart) setInterval(() => { chart.src = "/console/chart.svg?t=" + Date.now(); }, 30000);
});
