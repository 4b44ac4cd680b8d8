// Shared by every console page. The pages work without it: it only makes times local.

// Times are rendered in UTC (<time datetime="...">); show them in the reader's own timezone:
// the date and the time, or the time of day alone for <time class="short"> (a timeline's rows),
// the whole of it in the tooltip.
function localTimes(root) {
  for (const el of (root || document).querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (isNaN(when)) continue;
    el.textContent = el.classList.contains("short")
      ? when.toLocaleTimeString(undefined, { timeStyle: "medium" })
      : when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
    el.title = el.getAttribute("datetime");
  }
}
document.addEventListener("DOMContentLoaded", () => localTimes(document));
window.localTimes = localTimes;
