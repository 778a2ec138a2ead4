//! Tags (`/tags`) and the tags on VMs, hosts and templates (`/{vms,hosts,templates}/{id}/tags`),
//! as oVirt's `TagsService` and `AssignedTagsService`: the root tag (all zeros, named `root`)
//! is listed first and is every top tag's `<parent>`; a tag is named by id or `<name>`.

use crate::commands::{root_tag, UpdateTag};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::out::Out;
use super::super::write::{self, collection, href};
use super::super::{Req, Resp, API};
use super::infra::root_entity;
use super::{action_complete, check_follow, parse_id, required};

/// The tag `e` names (`id` attribute or `<name>`); `root` is the root tag.
async fn tag_ref(r: &Req, e: &Elem) -> Result<TagId, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "tag");
    }
    let n = e
        .str("name")
        .ok_or_else(|| ApiError::bad_request(format!("<{}> needs an id or a <name>", e.name)))?;
    if n == ROOT_TAG_NAME {
        return Ok(ROOT_TAG_ID);
    }
    Ok(r.db()
        .tag_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("tag {n} not found")))?
        .id)
}

async fn tag(r: &Req, i: usize) -> Result<Tag, ApiError> {
    let id: TagId = r.id(i, "tag")?;
    if id == ROOT_TAG_ID {
        return Ok(root_tag());
    }
    r.db()
        .tag_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("tag {id} not found")))
}

fn one_tag(r: &Req, t: &Tag, on: Option<&str>) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::tag(o, t, on));
    o
}

pub async fn tag_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let mut tags = vec![root_tag()];
    tags.extend(r.db().tag_list().await?);
    let mut o = r.out();
    collection(&mut o, "tags", "tag", &tags, |o, t| write::tag(o, t, None));
    Ok(Resp::ok(o))
}

pub async fn tag_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("tag")?;
    let parent = match b.get("parent") {
        Some(p) => Some(tag_ref(r, p).await?),
        None => None,
    };
    let t = r
        .cmds()
        .add_tag(
            required(&b, "name")?,
            &b.string("description").unwrap_or_default(),
            parent,
        )
        .await?;
    Ok(Resp::created(one_tag(r, &t, None), href("tags", t.id)))
}

pub async fn tag_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let t = tag(r, 0).await?;
    Ok(Resp::ok(one_tag(r, &t, None)))
}

pub async fn tag_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("tag")?;
    let id: TagId = r.id(0, "tag")?;
    let parent = match b.get("parent") {
        Some(p) => Some(tag_ref(r, p).await?),
        None => None,
    };
    let t = r
        .cmds()
        .update_tag(
            id,
            UpdateTag {
                name: b.string("name"),
                description: b.get("description").map(|d| d.text.trim().to_string()),
                parent,
            },
        )
        .await?;
    Ok(Resp::ok(one_tag(r, &t, None)))
}

pub async fn tag_remove(r: &Req) -> Result<Resp, ApiError> {
    let id: TagId = r.id(0, "tag")?;
    r.cmds().remove_tag(id).await?;
    Ok(action_complete(r))
}

/// What carries the tags of an `AssignedTagsService` path.
#[derive(Debug, Clone, Copy)]
pub enum Carrier {
    Vm,
    Host,
    Template,
}

/// The carrier named by the path's first id, checked to exist, and its base path.
async fn carrier(r: &Req, c: Carrier) -> Result<(TagTarget, String), ApiError> {
    let (on, found, coll) = match c {
        Carrier::Vm => {
            let id: VmId = r.id(0, "VM")?;
            (TagTarget::Vm(id), r.db().vm_get(id).await?.is_some(), "vms")
        }
        Carrier::Host => {
            let id: HostUuid = r.id(0, "host")?;
            (TagTarget::Host(id), r.db().host_get(id).await?.is_some(), "hosts")
        }
        Carrier::Template => {
            let id: TemplateId = r.id(0, "template")?;
            (
                TagTarget::Template(id),
                r.db().template_get(id).await?.is_some(),
                "templates",
            )
        }
    };
    let base = format!("{coll}/{}", r.param(0));
    if !found {
        return Err(ApiError::not_found(format!("{base} not found")));
    }
    Ok((on, base))
}

pub async fn assigned_list(r: &Req, c: Carrier) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let (on, base) = carrier(r, c).await?;
    let tags = r.db().tags_of(on).await?;
    let mut o = r.out();
    collection(&mut o, "tags", "tag", &tags, |o, t| write::tag(o, t, Some(&base)));
    Ok(Resp::ok(o))
}

pub async fn assigned_add(r: &Req, c: Carrier) -> Result<Resp, ApiError> {
    let (on, base) = carrier(r, c).await?;
    let b = r.body("tag")?;
    let id = tag_ref(r, &b).await?;
    let t = r.cmds().assign_tag(id, on).await?;
    Ok(Resp::created(
        one_tag(r, &t, Some(&base)),
        format!("{API}/{base}/tags/{}", t.id),
    ))
}

pub async fn assigned_get(r: &Req, c: Carrier) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let (on, base) = carrier(r, c).await?;
    let id: TagId = r.id(1, "tag")?;
    let t = r
        .db()
        .tags_of(on)
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| ApiError::not_found(format!("tag {id} is not on {base}")))?;
    Ok(Resp::ok(one_tag(r, &t, Some(&base))))
}

pub async fn assigned_remove(r: &Req, c: Carrier) -> Result<Resp, ApiError> {
    let (on, _) = carrier(r, c).await?;
    let id: TagId = r.id(1, "tag")?;
    r.cmds().unassign_tag(id, on).await?;
    Ok(action_complete(r))
}
