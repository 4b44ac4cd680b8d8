// The fleet page: a drain or a resume asks first. Without JavaScript the form posts without
// confirm=yes and the server shows a page that asks instead (console/lists.py agent_action).
document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-confirm]");
  if (!form) return;
  if (!window.confirm(form.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  form.querySelector('input[name="confirm"]').value = "yes";
});
