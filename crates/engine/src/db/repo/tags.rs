//! Tags and what they are put on. The root tag is not stored: a tag with no parent is under it.
//! Invariant: the tree has no cycles (a tag is never moved under itself or a descendant; the
//! command layer checks it with [`tag_list`] before [`tag_update`]).

use sqlx::any::AnyRow;

use super::infra::check_name;
use crate::db::sql::{Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;

const TAG_COLS: &str = "id, name, description, parent_id, created_at";

fn tag_from_row(r: &AnyRow) -> Result<Tag, DbError> {
    Ok(Tag {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        parent: r.opt_parse("parent_id")?,
        created_at: r.ts("created_at")?,
    })
}

async fn tag_insert(c: &mut Conn<'_>, t: &Tag) -> Result<Tag, DbError> {
    check_name("tag name", &t.name)?;
    let mut q = Sql::new(&format!("INSERT INTO tags ({TAG_COLS}) VALUES ("));
    q.arg(t.id.to_string())
        .push(", ")
        .arg(t.name.as_str())
        .push(", ")
        .arg(t.description.as_str())
        .push(", ")
        .arg(Arg::Text(t.parent.map(|p| p.to_string())))
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "tag", &t.name).await?;
    tag_get(c, t.id)
        .await?
        .ok_or_else(|| DbError::not_found("tag", t.id))
}

/// Writes a tag's name, description and parent.
async fn tag_update(c: &mut Conn<'_>, t: &Tag) -> Result<Tag, DbError> {
    check_name("tag name", &t.name)?;
    let mut q = Sql::new("UPDATE tags SET name = ");
    q.arg(t.name.as_str())
        .push(", description = ")
        .arg(t.description.as_str())
        .push(", parent_id = ")
        .arg(Arg::Text(t.parent.map(|p| p.to_string())))
        .push(" WHERE id = ")
        .arg(t.id.to_string());
    if c.exec_as(&q, "tag", &t.name).await? == 0 {
        return Err(DbError::not_found("tag", t.id));
    }
    tag_get(c, t.id)
        .await?
        .ok_or_else(|| DbError::not_found("tag", t.id))
}

async fn tag_get(c: &mut Conn<'_>, id: TagId) -> Result<Option<Tag>, DbError> {
    let mut q = Sql::new(&format!("SELECT {TAG_COLS} FROM tags WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(tag_from_row).transpose()
}

async fn tag_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<Tag>, DbError> {
    let mut q = Sql::new(&format!("SELECT {TAG_COLS} FROM tags WHERE name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(tag_from_row).transpose()
}

/// Every tag, by name.
async fn tag_list(c: &mut Conn<'_>) -> Result<Vec<Tag>, DbError> {
    let q = Sql::new(&format!("SELECT {TAG_COLS} FROM tags ORDER BY name, id"));
    c.all(&q).await?.iter().map(tag_from_row).collect()
}

/// Removes a tag; its descendants and assignments go with it (cascade).
async fn tag_delete(c: &mut Conn<'_>, id: TagId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM tags WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "tag", id).await? == 0 {
        return Err(DbError::not_found("tag", id));
    }
    Ok(())
}

/// The assignment table and key column for what a tag is on, and its id.
fn target(t: TagTarget) -> (&'static str, &'static str, String) {
    match t {
        TagTarget::Vm(v) => ("tag_vms", "vm_id", v.to_string()),
        TagTarget::Host(h) => ("tag_hosts", "host_id", h.to_string()),
        TagTarget::Template(t) => ("tag_templates", "template_id", t.to_string()),
    }
}

/// Puts tag `tag` on `on`; a second time is a conflict.
async fn tag_assign(c: &mut Conn<'_>, tag: TagId, on: TagTarget) -> Result<(), DbError> {
    let (table, col, id) = target(on);
    let mut q = Sql::new(&format!("INSERT INTO {table} (tag_id, {col}) VALUES ("));
    q.arg(tag.to_string()).push(", ").arg(id.clone()).push(")");
    c.exec_as(&q, "tag assignment", format!("tag {tag} on {id}"))
        .await?;
    Ok(())
}

/// Takes tag `tag` off `on`; whether it was there.
async fn tag_unassign(c: &mut Conn<'_>, tag: TagId, on: TagTarget) -> Result<bool, DbError> {
    let (table, col, id) = target(on);
    let mut q = Sql::new(&format!("DELETE FROM {table} WHERE tag_id = "));
    q.arg(tag.to_string()).push(&format!(" AND {col} = ")).arg(id);
    Ok(c.exec(&q).await? == 1)
}

/// The tags on `on`, by name.
async fn tags_of(c: &mut Conn<'_>, on: TagTarget) -> Result<Vec<Tag>, DbError> {
    let (table, col, id) = target(on);
    let mut q = Sql::new(&format!(
        "SELECT t.id, t.name, t.description, t.parent_id, t.created_at FROM tags t JOIN {table} a \
         ON a.tag_id = t.id WHERE a.{col} = "
    ));
    q.arg(id).push(" ORDER BY t.name, t.id");
    c.all(&q).await?.iter().map(tag_from_row).collect()
}

repo! {
    write tag_insert(t: &Tag) -> Tag = tag_insert;
    write tag_update(t: &Tag) -> Tag = tag_update;
    read tag_get(id: TagId) -> Option<Tag> = tag_get;
    read tag_get_by_name(name: &str) -> Option<Tag> = tag_get_by_name;
    read tag_list() -> Vec<Tag> = tag_list;
    write tag_delete(id: TagId) -> () = tag_delete;
    write tag_assign(tag: TagId, on: TagTarget) -> () = tag_assign;
    write tag_unassign(tag: TagId, on: TagTarget) -> bool = tag_unassign;
    read tags_of(on: TagTarget) -> Vec<Tag> = tags_of;
}
