// Shared by every console page. The pages work without it: it only makes times local.

// Times are rendered in UTC (<time datetime="...">); show them in the reader's own timezone.
function localTimes(root) {
  for (const el of (root || document).querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (isNaN(when)) continue;
    el.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
    el.title = el.getAttribute("datetime");
  }
}
document.addEventListener("DOMContentLoaded", () => localTimes(document));
window.localTimes = localTimes;
